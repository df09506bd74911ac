// FL_CPU_CLONES: the CPU kernels' loops are compiled for AVX-512, AVX2 and baseline x86-64 and
// picked once at load time (GCC function multiversioning), so one build runs everywhere at the
// machine's best width. Only the marked functions and what they inline get the wider ISA: ATen's
// inline code is untouched.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FL_CPU_CLONES
#endif
