# CMake toolchain for 64-bit ARM Linux with Debian's cross compiler (apt-get install
# g++-aarch64-linux-gnu qemu-user). Used to prove that the kernels build and stay exact off x86
# (the scalar and NEON paths) without an ARM machine; tests/test_cpp_kernels.py runs:
#   cmake -S xla_ffi -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=xla_ffi/cmake/aarch64-linux-gnu.cmake \
#         -DBITNET_JAX_BUILD_PYTHON=OFF -DBITNET_JAX_BUILD_TESTS=ON
#   cmake --build build-arm64 --target kernel_test
#   qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu build-arm64/kernel_test         # with sdot
#   qemu-aarch64 -cpu cortex-a57 -L /usr/aarch64-linux-gnu build-arm64/kernel_test  # without
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Headers and libraries from the cross sysroot only; programs (cmake's own tools) from the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# How to run what this builds on an x86 host (-L: where the ARM dynamic loader and libstdc++ are).
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
