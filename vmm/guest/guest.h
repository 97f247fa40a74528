/* Vireo test guest: shared helpers (port and MMIO access, console). */
#ifndef VIREO_GUEST_H
#define VIREO_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- fixed addresses and ports of the machine (docs/vmm.md) ---- */
#define BOOT_TIMER_ADDR   0xC0000000UL  /* MMIO: write byte 123 = "booted" */
#define BOOT_TIMER_MAGIC  123
#define COM1_PORT         0x3F8         /* 8250 UART, COM1 */
#define POWER_PORT        0x600         /* VMM ACPI sleep control register */
#define PVPANIC_PORT      0x505         /* pvpanic: write 1 = "the kernel panicked" */
#define POWER_OFF_VALUE   ((5 << 2) | (1 << 5)) /* SLP_TYP=5 (S5), SLP_EN */
#define DEBUG_EXIT_PORT   0xF4          /* QEMU isa-debug-exit */
#define I8042_DATA        0x60          /* i8042 data port */
#define I8042_STATUS      0x64          /* i8042 status/command port */
#define VIRTIO_MMIO_BASE  0xFEB00000UL  /* first virtio-mmio slot */
#define VIRTIO_MMIO_STRIDE 0x200        /* bytes between slots */
#define VIRTIO_SLOTS      24            /* slots scanned */
#define VIRTIO_GSI_BASE   5             /* slot i raises GSI 5 + i */
#define IOAPIC_BASE       0xFEC00000UL  /* IOAPIC register select / window */
#define LAPIC_DEFAULT     0xFEE00000UL  /* local APIC default base */
#define CPUHP_PORT        0x610         /* vireo-vmm CPU hot-plug controller: SEL, STA, PEND, CNT */
#define CPUHP_GSI         23            /* its interrupt */

/* ---- port I/O ---- */
static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); /* write an I/O port */
}
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); /* read an I/O port */
    return v;
}

/* ---- MMIO: plain mov instructions only, so that every access is a
 * simple load/store that any instruction emulator handles. ---- */
static inline uint32_t mmio_read32(uint64_t addr)
{
    uint32_t v;
    __asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory"); /* 32-bit MMIO load */
    return v;
}
static inline void mmio_write32(uint64_t addr, uint32_t v)
{
    __asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(addr) : "memory"); /* 32-bit MMIO store */
}
static inline uint8_t mmio_read8(uint64_t addr)
{
    uint8_t v;
    __asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(addr) : "memory"); /* 8-bit MMIO load */
    return v;
}
static inline void mmio_write8(uint64_t addr, uint8_t v)
{
    __asm__ volatile("movb %0, (%1)" : : "q"(v), "r"(addr) : "memory"); /* 8-bit MMIO store */
}

/* Compiler barrier and full fence (x86 keeps stores in order; the fence
 * orders ring updates against the device's view before a notify). */
#define barrier() __asm__ volatile("" : : : "memory")
static inline void mfence(void) { __asm__ volatile("mfence" : : : "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause"); } /* spin-wait hint */

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); /* time-stamp counter */
    return ((uint64_t)hi << 32) | lo;
}
static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); /* read MSR ecx */
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))); /* write MSR ecx */
}

/* ---- libc bits gcc may call even when freestanding ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* ---- console (console.c) ---- */
void serial_init(void);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- bounded waiting ---- */
/* A deadline about `ms` milliseconds away (assumes a TSC of at most a few
 * GHz; an upper bound on iterations covers a TSC that does not move). */
struct deadline { uint64_t tsc_end; uint64_t spins_left; };
static inline struct deadline deadline_ms(uint64_t ms)
{
    struct deadline d = { rdtsc() + ms * 3000000ULL, ms * 200000ULL };
    return d;
}
static inline int deadline_passed(struct deadline *d)
{
    if (d->spins_left == 0 || rdtsc() > d->tsc_end)
        return 1;
    d->spins_left--;
    return 0;
}

/* ---- memory (main.c) ---- */
void *heap_alloc(size_t size, size_t align, int zero);
uint64_t heap_seal(uint64_t *end);

/* ---- virtio (virtio.c) ---- */
int virtio_scan(int echo, uint32_t bench_frames, uint32_t bench_size);
void virtio_blk_bench(uint32_t mib, uint32_t kib, uint32_t depth);
void virtio_ack_slot(int slot);
int virtio_slot_present(int slot);
void virtio_poll_all(void);
/* vireo.vsock=listen:PORT (mode 1) or connect:PORT (mode 2) */
void virtio_vsock_option(int mode, uint32_t port);

#endif
