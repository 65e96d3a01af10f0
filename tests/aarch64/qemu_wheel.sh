#!/usr/bin/env bash
# The nanobind tier as a whole on aarch64, from an x86-64 Debian 12 machine (as root): the extension
# cross-compiled by its own CMakeLists.txt against MLX's aarch64 wheel, imported by Debian's aarch64
# Python 3.11 under qemu-user, and the tier's tests (tests/nanobind by default) run there. Not part of CI:
# it adds the arm64 architecture to dpkg (for apt-get download only; nothing arm64 is installed), and
# registers qemu-aarch64 with binfmt_misc (tests start Python subprocesses). CI runs the lighter check in
# this folder (test_nanobind_aarch64.py: the drivers and kernels alone, no MLX, no Python on aarch64).
#
#   tests/aarch64/qemu_wheel.sh [pytest args]      (work dir: $WORK, default /tmp/natten-mlx-aarch64)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${WORK:-/tmp/natten-mlx-aarch64}"
MLX_VERSION=$(sed -n 's/^set(NATTEN_MLX_PINNED_MLX "\(.*\)")/\1/p' "$ROOT/packages/natten-mlx-nanobind/CMakeLists.txt")
mkdir -p "$WORK"/{debs,sysroot,site,bin}

# tools: cross compiler, qemu-user, cmake, ninja
command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null \
  || apt-get install -y -q crossbuild-essential-arm64 qemu-user

# an aarch64 Debian tree with Python 3.11 (the packages unpacked, not installed)
if [ ! -x "$WORK/sysroot/usr/bin/python3.11" ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -q; }
  (cd "$WORK/debs" && apt-get download \
    python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libpython3.11-dev:arm64 \
    libexpat1:arm64 zlib1g:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 \
    libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libuuid1:arm64 libdb5.3:arm64 \
    libnsl2:arm64 libtirpc3:arm64 libcrypt1:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64 libk5crypto3:arm64 \
    libkrb5support0:arm64 libcom-err2:arm64 libkeyutils1:arm64 libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64)
  for d in "$WORK"/debs/*.deb; do dpkg -x "$d" "$WORK/sysroot"; done
fi

# MLX's aarch64 wheels and the tests' dependencies, for that Python
pip install -q --target "$WORK/site" --only-binary=:all: --platform manylinux_2_35_aarch64 \
  --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --python-version 3.11 \
  --implementation cp --abi cp311 numpy pytest hypothesis pluggy "mlx==$MLX_VERSION" "mlx-cpu==$MLX_VERSION" \
  "nanobind==3.1.0"

# the aarch64 Python as one command; MLX compiles mx.compile'd CPU graphs with g++: give it the cross compiler
# (the site goes on its sys.path by a .pth file, as an installed package would: tests start Python with their own
# PYTHONPATH). MLX's CPU compile cache lives in $TMPDIR/mlx, keyed without the architecture: the aarch64 runs get
# their own TMPDIR, or x86 processes on the machine would find aarch64 libraries there and fail to load them.
mkdir -p "$WORK/sysroot/usr/lib/python3/dist-packages" "$WORK/tmp"
echo "$WORK/site" >"$WORK/sysroot/usr/lib/python3/dist-packages/natten_mlx_aarch64.pth"
cat >"$WORK/bin/python" <<EOF
#!/bin/sh
TMPDIR=$WORK/tmp QEMU_LD_PREFIX=$WORK/sysroot exec qemu-aarch64 $WORK/sysroot/usr/bin/python3.11 "\$@"
EOF
printf '#!/bin/sh\nexec aarch64-linux-gnu-g++ "$@"\n' >"$WORK/bin/g++"
printf '#!/bin/sh\nexec aarch64-linux-gnu-gcc "$@"\n' >"$WORK/bin/gcc"
cp "$WORK/bin/g++" "$WORK/bin/c++"
chmod +x "$WORK"/bin/*
cat >"$WORK/aarch64.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;$WORK/sysroot)
set(CMAKE_CXX_FLAGS_INIT "-I$WORK/sysroot/usr/include")
EOF

# the extension, by the package's own CMakeLists.txt, installed next to mlx in the aarch64 site
rm -rf "$WORK/build"
cmake -S "$ROOT/packages/natten-mlx-nanobind" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$WORK/aarch64.cmake" -DPython_EXECUTABLE="$WORK/bin/python" \
  -DPython_INCLUDE_DIR="$WORK/sysroot/usr/include/python3.11"
ninja -C "$WORK/build"
cmake --install "$WORK/build" --prefix "$WORK/site"
rm -rf "$WORK/site/natten_mlx_nanobind-"*.dist-info
cp "$ROOT"/packages/natten-mlx-nanobind/src/natten_mlx_nanobind/*.py "$WORK/site/natten_mlx_nanobind/"
# the entry point the core discovers tiers by
dist="$WORK/site/natten_mlx_nanobind-0+aarch64.dist-info"
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: natten-mlx-nanobind\nVersion: 0+aarch64\n' >"$dist/METADATA"
sed -n '/\[project.entry-points."natten_mlx.backends"\]/,/^$/p' "$ROOT/packages/natten-mlx-nanobind/pyproject.toml" \
  | sed 's/\[project.entry-points."natten_mlx.backends"\]/[natten_mlx.backends]/; s/"//g' >"$dist/entry_points.txt"

# tests start Python subprocesses (sys.executable): let the kernel run aarch64 binaries through qemu
[ -d /proc/sys/fs/binfmt_misc ] && [ -e /proc/sys/fs/binfmt_misc/register ] \
  || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64:' >/proc/sys/fs/binfmt_misc/register

cd "$ROOT"
"$WORK/bin/python" -c "import platform, mlx.core as mx, natten_mlx_nanobind as nb; \
print(platform.machine(), 'mlx', mx.__version__, 'nanobind tier:', nb.UNAVAILABLE or nb.extension().simd())"
# the core must find the tier through its entry point (NATTEN_BACKEND=nanobind below relies on it)
PYTHONPATH="$ROOT/packages/natten-mlx-core/src" "$WORK/bin/python" -W error -c "import natten_mlx.plugins as p; \
assert 'nanobind' in p.list_engines().backends, p.list_engines().plugins"
PATH="$WORK/bin:$PATH" PYTHONPATH="$ROOT/packages/natten-mlx-core/src" NATTEN_BACKEND=nanobind \
  "$WORK/bin/python" -m pytest -q -p no:cacheprovider -rs "${@:-tests/nanobind}"
