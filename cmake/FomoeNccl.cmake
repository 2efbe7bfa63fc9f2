# NCCL for the federation's transport (csrc/cuda/comm*.cpp).
#
# fomoe must use the NCCL that torch itself loads, so the default is the NCCL of the
# nvidia-nccl-cu* wheel installed next to torch (it ships include/nccl.h and lib/libnccl.so.2).
# Override with FOMOE_NCCL_ROOT (a directory with include/nccl.h and lib/libnccl.so*), as a CMake
# variable or environment variable. At import, fomoe.comm checks that the loaded NCCL is at
# least the version of the header compiled against.

function(fomoe_find_nccl)
  if(TARGET fomoe::nccl)
    return()
  endif()
  set(roots "")
  if(DEFINED FOMOE_NCCL_ROOT)
    list(APPEND roots "${FOMOE_NCCL_ROOT}")
  elseif(DEFINED ENV{FOMOE_NCCL_ROOT})
    list(APPEND roots "$ENV{FOMOE_NCCL_ROOT}")
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import importlib.util, os; s = importlib.util.find_spec('nvidia.nccl'); print(list(s.submodule_search_locations)[0] if s else '')"
    OUTPUT_VARIABLE wheel_root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(wheel_root)
    list(APPEND roots "${wheel_root}")
  endif()
  list(APPEND roots "${CUDAToolkit_LIBRARY_ROOT}" "/usr" "/usr/local")
  find_path(FOMOE_NCCL_INCLUDE_DIR nccl.h PATHS ${roots} PATH_SUFFIXES include NO_DEFAULT_PATH)
  find_library(FOMOE_NCCL_LIBRARY NAMES nccl libnccl.so.2 PATHS ${roots}
               PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu NO_DEFAULT_PATH)
  if(NOT FOMOE_NCCL_INCLUDE_DIR OR NOT FOMOE_NCCL_LIBRARY)
    message(FATAL_ERROR "fomoe: NCCL not found (looked in: ${roots}). Install the nvidia-nccl-cu* wheel that "
                        "matches torch, set FOMOE_NCCL_ROOT, or leave the comm sources out with "
                        "FOMOE_CUDA_SOURCES.")
  endif()
  file(STRINGS "${FOMOE_NCCL_INCLUDE_DIR}/nccl.h" code_line REGEX "^#define NCCL_VERSION_CODE ")
  message(STATUS "fomoe: NCCL ${code_line} from ${FOMOE_NCCL_INCLUDE_DIR}, library ${FOMOE_NCCL_LIBRARY}")
  add_library(fomoe::nccl UNKNOWN IMPORTED GLOBAL)
  set_target_properties(fomoe::nccl PROPERTIES
    IMPORTED_LOCATION "${FOMOE_NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${FOMOE_NCCL_INCLUDE_DIR}")
  get_filename_component(lib_dir "${FOMOE_NCCL_LIBRARY}" DIRECTORY)
  set(FOMOE_NCCL_LIBRARY_DIR "${lib_dir}" PARENT_SCOPE)
endfunction()

# Links NCCL into `target`. torch has already loaded libnccl.so.2 when fomoe._C is imported, so
# the loader reuses that copy (same soname); the rpath is only a fallback.
function(fomoe_link_nccl target)
  fomoe_find_nccl()
  target_link_libraries(${target} PRIVATE fomoe::nccl)
  get_target_property(lib fomoe::nccl IMPORTED_LOCATION)
  get_filename_component(lib_dir "${lib}" DIRECTORY)
  set_property(TARGET ${target} APPEND PROPERTY BUILD_RPATH "${lib_dir}")
  target_compile_definitions(${target} PRIVATE FOMOE_WITH_NCCL)
endfunction()
