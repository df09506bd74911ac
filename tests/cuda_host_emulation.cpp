// Host emulation of lstm_cuda.cu's per-step launches (no projection, BT = 2): every (block, warp,
// lane) runs the __host__ __device__ functions of csrc/cuda/lstm_cuda_thread.h with the same
// shared-memory staging and a summed stand-in for the warp all-reduce, so the index arithmetic
// is checked without a GPU. The staging loops mirror the kernels by hand: keep them in sync.
#include <torch/extension.h>
#include "../csrc/cuda/lstm_cuda_thread.h"
#include "../csrc/lstm_common.h"
using namespace fused_lstm; using namespace fused_lstm::cuda_work;
using T = double; using A = double;
constexpr int BT = 2;

std::vector<at::Tensor> fwd(at::Tensor gates, at::Tensor w_hh, at::Tensor h0, at::Tensor c0, at::Tensor bsz, bool reverse) {
  int64_t H = w_hh.size(0)/4, Hr = w_hh.size(1), B = h0.size(0);
  at::Tensor x = at::empty({bsz.sum().item<int64_t>(), 1});
  StepLayout L = make_steps(x, bsz, B, reverse);
  gates = gates.clone(); auto cells = at::empty({L.rows, H}, gates.options()); auto out = at::empty({L.rows, Hr}, gates.options());
  auto h_n = h0.clone(); auto c_run = c0.clone();
  T* pg = gates.data_ptr<T>();
  for (size_t s = 0; s < L.start.size(); ++s) {
    int64_t start=L.start[s], bs=L.size[s], ps = s? L.start[s-1]:0, pz = s? L.size[s-1]:0;
    int gx = (H + kWarps - 1)/kWarps, gy = (bs + BT - 1)/BT;
    for (int bx=0; bx<gx; ++bx) for (int by=0; by<gy; ++by) {
      std::vector<A> sx(BT*kChunk);
      std::vector<std::array<std::array<A,BT>,4>> accs(kThreads);
      for (auto& a: accs) for (auto& g: a) g.fill(0);
      for (int64_t k0=0;k0<Hr;k0+=kChunk){ int kc = std::min<int64_t>(kChunk, Hr-k0);
        for (int i=0;i<BT*kChunk;++i){int r=i/kChunk,k=i%kChunk; int64_t b=by*BT+r;
          sx[i] = (b<bs && k<kc) ? load_h_prev<T,A>(b,k0+k,Hr,ps,pz,out.data_ptr<T>(),h0.data_ptr<T>()) : 0;}
        for (int t=0;t<kThreads;++t){ int lane=t%32; int64_t j=bx*kWarps+t/32; if (j<H){
          A acc[4][BT]; for(int g=0;g<4;++g)for(int r=0;r<BT;++r)acc[g][r]=accs[t][g][r];
          lane_dot<4,BT>(w_hh.data_ptr<T>()+j*Hr+k0, H*Hr, sx.data(), kChunk, kc, lane, 32, acc);
          for(int g=0;g<4;++g)for(int r=0;r<BT;++r)accs[t][g][r]=acc[g][r];}}
      }
      for (int w=0; w<kWarps; ++w) { int64_t j=bx*kWarps+w; if (j>=H) continue;
        for (int lane=0; lane<BT; ++lane){ int64_t b=by*BT+lane; if(b>=bs) continue;
          A rec[4]; for(int g=0;g<4;++g){rec[g]=0; for(int l=0;l<32;++l) rec[g]+=accs[w*32+l][g][lane];}
          forward_unit<T,A>(start+b,b,j,H,rec,pg,cells.data_ptr<T>(),c_run.data_ptr<A>(),nullptr,out.data_ptr<T>(),h_n.data_ptr<T>());}}
    }
  }
  return {out, h_n, c_run, gates, cells};
}

std::vector<at::Tensor> bwd(at::Tensor dy, at::Tensor ghn, at::Tensor gcn, at::Tensor w_hh, at::Tensor c0, at::Tensor acts, at::Tensor cells, at::Tensor bsz, bool reverse) {
  int64_t H = w_hh.size(0)/4, Hr = w_hh.size(1), B = c0.size(0), G=4*H;
  at::Tensor x = at::empty({bsz.sum().item<int64_t>(), 1});
  StepLayout L = make_steps(x, bsz, B, reverse); int64_t S = L.start.size();
  auto wt = w_hh.t().contiguous(); auto dz = at::empty({L.rows, G}, acts.options());
  auto dc = gcn.clone(); auto gh0 = at::full({B, Hr}, 12345.0, acts.options());
  auto launch = [&](int64_t start,int64_t bs,int64_t ns,int64_t nz,int64_t ps,int64_t pz){
    int gx=(Hr+kWarps-1)/kWarps, gy=(std::max(bs,nz)+BT-1)/BT;
    for (int bx=0;bx<gx;++bx) for(int by=0;by<gy;++by){ int64_t b0=by*BT;
      std::vector<A> sx(BT*kChunk); std::vector<std::array<A,BT>> accs(kThreads); for(auto&a:accs)a.fill(0);
      if (b0<nz) for(int64_t k0=0;k0<G;k0+=kChunk){int kc=std::min<int64_t>(kChunk,G-k0);
        for(int i=0;i<BT*kChunk;++i){int r=i/kChunk,k=i%kChunk;int64_t b=b0+r; sx[i]=(b<nz&&k<kc)?dz.data_ptr<T>()[(ns+b)*G+k0+k]:0;}
        for(int t=0;t<kThreads;++t){int lane=t%32;int64_t u=bx*kWarps+t/32; if(u<Hr){A acc[1][BT]; for(int r=0;r<BT;++r)acc[0][r]=accs[t][r];
          lane_dot<1,BT>(wt.data_ptr<T>()+u*G+k0,0,sx.data(),kChunk,kc,lane,32,acc); for(int r=0;r<BT;++r)accs[t][r]=acc[0][r];}}}
      for(int w=0;w<kWarps;++w){int64_t u=bx*kWarps+w; if(u>=Hr)continue; for(int lane=0;lane<BT;++lane){int64_t b=b0+lane;
        A dot=0; for(int l=0;l<32;++l) dot+=accs[w*32+l][lane];
        if(b<bs){int64_t row=start+b; A dh=step_dh<T,A>(dot,row,b,u,Hr,nz,dy.data_ptr<T>(),ghn.data_ptr<T>());
          backward_unit<T,A>(row,prev_row(b,ps,pz),b,u,H,dh,acts.data_ptr<T>(),cells.data_ptr<T>(),c0.data_ptr<T>(),dc.data_ptr<A>(),dz.data_ptr<T>(),nullptr);}
        else if(b<nz) gh0.data_ptr<T>()[b*Hr+u]=dot;}}}
  };
  for(int64_t s=S-1;s>=0;--s) launch(L.start[s],L.size[s], s+1<S?L.start[s+1]:0, s+1<S?L.size[s+1]:0, s?L.start[s-1]:0, s?L.size[s-1]:0);
  if(S>0) launch(0,0,L.start[0],L.size[0],0,0);
  auto src = h_prev_sources(L);
  return {dz, gh0, dc, at::tensor(src)};
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m){ m.def("fwd",&fwd); m.def("bwd",&bwd); }
