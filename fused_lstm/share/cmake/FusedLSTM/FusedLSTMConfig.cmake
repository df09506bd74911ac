# find_package(FusedLSTM): the imported target FusedLSTM::fused_lstm, the native library of the
# fused_lstm Python package this file ships in (the op schemas, the kernels and their autograd;
# no Python). A program that links it has the ops fused_lstm::* in its dispatcher: they are
# registered when the library loads. Put this folder's grandparent on CMAKE_PREFIX_PATH:
#   python -c "import fused_lstm; print(fused_lstm.cmake_prefix_path)"
# and torch's (torch.utils.cmake_prefix_path), as find_package(Torch) needs. docs/deploying.md.
include(CMakeFindDependencyMacro)
find_dependency(Torch)

get_filename_component(_fused_lstm_package "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(FusedLSTM_LIBRARY "${_fused_lstm_package}/libfused_lstm.so")
unset(_fused_lstm_package)
if(NOT EXISTS "${FusedLSTM_LIBRARY}")
  set(FusedLSTM_FOUND FALSE)
  set(FusedLSTM_NOT_FOUND_MESSAGE
      "${FusedLSTM_LIBRARY} is missing: this fused_lstm was installed without its native library "
      "(FUSED_LSTM_NO_EXTENSION=1, or no C++ compiler at install)")
  return()
endif()

if(NOT TARGET FusedLSTM::fused_lstm)
  add_library(FusedLSTM::fused_lstm SHARED IMPORTED)
  set_target_properties(FusedLSTM::fused_lstm PROPERTIES
    IMPORTED_LOCATION "${FusedLSTM_LIBRARY}"
    INTERFACE_LINK_LIBRARIES "${TORCH_LIBRARIES}"
    # A program calls no function of the library, only the dispatcher: without this, a linker
    # that defaults to --as-needed (Debian's, Ubuntu's) leaves the library out of it.
    INTERFACE_LINK_OPTIONS "$<$<PLATFORM_ID:Linux>:LINKER:--no-as-needed>")
endif()
