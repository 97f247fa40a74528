#!/bin/sh
# Build the Vireo test guest: build.sh OUT_DIR
# Prints the path of the built ELF (vireo-test-guest.elf) as its last line.
set -eu
if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
SRC=$(cd "$(dirname "$0")" && pwd)
OUT=$1
CC=${CC:-gcc}
if ! command -v "$CC" >/dev/null 2>&1; then
    echo "build.sh: $CC not found; the test guest needs the host gcc (x86_64)" >&2
    exit 1
fi
case "$("$CC" -dumpmachine)" in
    x86_64-*) ;;
    *) echo "build.sh: $CC does not target x86_64 ($("$CC" -dumpmachine))" >&2; exit 1 ;;
esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ELF=$OUT/vireo-test-guest.elf

CFLAGS="-std=gnu11 -O2 -Wall -Wextra -Werror -ffreestanding -fno-builtin \
 -fno-tree-loop-distribute-patterns -nostdlib -static -fno-pic -fno-pie -no-pie \
 -m64 -mcmodel=small -mno-red-zone -mgeneral-regs-only -fno-stack-protector \
 -fno-asynchronous-unwind-tables -fno-unwind-tables -fcf-protection=none \
 -fno-omit-frame-pointer"
LDFLAGS="-Wl,-T,$SRC/link.ld -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 \
 -Wl,-z,noexecstack"

SOURCES="$SRC/entry.S $SRC/main.c $SRC/console.c $SRC/virtio.c"

# Rebuild only when a source, the script or the compiler changed.
STAMP=$OUT/.vireo-test-guest.stamp
want=$( (cat $SOURCES "$SRC/guest.h" "$SRC/link.ld" "$0"; "$CC" --version) | cksum)
if [ -f "$ELF" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "$ELF"
    exit 0
fi

# shellcheck disable=SC2086
"$CC" $CFLAGS $LDFLAGS -o "$ELF.tmp" $SOURCES
mv "$ELF.tmp" "$ELF"
echo "$want" > "$STAMP"
echo "$ELF"
