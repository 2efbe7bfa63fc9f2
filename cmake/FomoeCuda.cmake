# CUDA side of the fomoe build. Included by the top-level CMakeLists.txt when
# FOMOE_WITH_CUDA is on, and by cmake/cuda_check (the CI compile-only check of the
# torch-free kernel sources), so both compile kernels with the same flags.
#
# Kernel files (csrc/cuda/*.cu) include no torch headers: raw pointers, sizes, strides
# and a cudaStream_t. Glue files (csrc/cuda/*.cpp) hold the TORCH_LIBRARY_IMPL(fomoe, CUDA)
# registrations and need a CUDA build of torch.

if(NOT DEFINED FOMOE_CUDA_ARCHS)
  set(FOMOE_CUDA_ARCHS "90a")
endif()
# Architectures come from the build configuration, never from querying a GPU.
set(CMAKE_CUDA_ARCHITECTURES ${FOMOE_CUDA_ARCHS})
set(ENV{TORCH_CUDA_ARCH_LIST} "")
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)  # kernel files are torch-free; C++17 is what CUTLASS and CMake 3.24+ agree on
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

set(FOMOE_SOURCE_ROOT "${CMAKE_CURRENT_LIST_DIR}/..")
file(GLOB FOMOE_CUDA_KERNEL_SOURCES CONFIGURE_DEPENDS "${FOMOE_SOURCE_ROOT}/csrc/cuda/*.cu")
list(FILTER FOMOE_CUDA_KERNEL_SOURCES EXCLUDE REGEX "build_marker\\.cu$")
file(GLOB FOMOE_CUDA_GLUE_SOURCES CONFIGURE_DEPENDS "${FOMOE_SOURCE_ROOT}/csrc/cuda/*.cpp")
# Development knob: FOMOE_CUDA_SOURCES (a regex on file names, e.g. "^routing") builds only the
# matching kernel families; ops left out run the reference fallback with a warning.
if(DEFINED ENV{FOMOE_CUDA_SOURCES} AND NOT "$ENV{FOMOE_CUDA_SOURCES}" STREQUAL "")
  foreach(var FOMOE_CUDA_KERNEL_SOURCES FOMOE_CUDA_GLUE_SOURCES)
    set(kept "")
    foreach(src ${${var}})
      get_filename_component(fname "${src}" NAME)
      if(fname MATCHES "$ENV{FOMOE_CUDA_SOURCES}")
        list(APPEND kept "${src}")
      endif()
    endforeach()
    set(${var} ${kept})
  endforeach()
  message(STATUS "fomoe: CUDA sources limited to /$ENV{FOMOE_CUDA_SOURCES}/: ${FOMOE_CUDA_KERNEL_SOURCES} ${FOMOE_CUDA_GLUE_SOURCES}")
endif()

set(FOMOE_CUDA_FLAGS --expt-relaxed-constexpr -lineinfo -Xptxas=-warn-spills)

# CUTLASS/CuTe headers (the nvidia-cutlass pip package) when the kernels need them.
if(NOT DEFINED FOMOE_CUTLASS_INCLUDE)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include') if s else '')"
    OUTPUT_VARIABLE FOMOE_CUTLASS_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
endif()
if(NOT (FOMOE_CUTLASS_INCLUDE AND EXISTS "${FOMOE_CUTLASS_INCLUDE}"))
  message(WARNING "fomoe: CUTLASS headers not found (pip install nvidia-cutlass): the Hopper grouped-GEMM "
                  "kernels are left out and expert GEMMs will run the much slower portable kernels")
endif()

# Torch-free kernels as an object library, shared by the extension and the CI check.
function(fomoe_add_cuda_kernels target)
  add_library(${target} OBJECT ${FOMOE_CUDA_KERNEL_SOURCES} "${FOMOE_SOURCE_ROOT}/csrc/cuda/build_marker.cu")
  target_include_directories(${target} PRIVATE "${FOMOE_SOURCE_ROOT}/csrc")
  if(FOMOE_CUTLASS_INCLUDE AND EXISTS "${FOMOE_CUTLASS_INCLUDE}")
    target_include_directories(${target} SYSTEM PRIVATE "${FOMOE_CUTLASS_INCLUDE}")
    target_compile_definitions(${target} PRIVATE FOMOE_HAVE_CUTLASS)
  endif()
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${FOMOE_CUDA_FLAGS}>)
  # Set on the target: torch's CMake config (found after this file is included) turns
  # CMAKE_CUDA_ARCHITECTURES off.
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON CUDA_ARCHITECTURES "${FOMOE_CUDA_ARCHS}")
endfunction()

function(fomoe_add_cuda_sources target)
  # Torch's CMake config also appends -gencode flags for the GPU it detects (plain sm_90 on a
  # Hopper: no wgmma, so the CUTLASS kernels would compile to stubs). Drop them so the kernels
  # build for FOMOE_CUDA_ARCHS alone.
  string(REGEX REPLACE "-gencode[ =]+arch=compute_[0-9]+[a-z]?,code=[a-z_0-9]+" "" cuda_flags "${CMAKE_CUDA_FLAGS}")
  set(CMAKE_CUDA_FLAGS "${cuda_flags}" PARENT_SCOPE)
  find_package(CUDAToolkit REQUIRED)
  fomoe_add_cuda_kernels(fomoe_cuda_kernels)
  target_sources(${target} PRIVATE ${FOMOE_CUDA_GLUE_SOURCES} $<TARGET_OBJECTS:fomoe_cuda_kernels>)
  target_compile_definitions(${target} PRIVATE FOMOE_WITH_CUDA)
  target_link_libraries(${target} PRIVATE CUDA::cudart)
  # The federation's NCCL transport (csrc/cuda/comm*.cpp) links the NCCL torch uses.
  if(FOMOE_CUDA_GLUE_SOURCES MATCHES "/comm[^/]*\\.cpp")
    include(FomoeNccl)
    fomoe_link_nccl(${target})
  endif()
endfunction()
