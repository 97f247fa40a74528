/*
 * kvm-run64: a minimal /dev/kvm harness that boots the Vireo test guest
 * through its 64-bit ELF entry (e_entry, Linux 64-bit boot protocol), the
 * path vireo-vmm uses for an ELF vmlinux, or with --pvh 1 through the PVH
 * note (32-bit protected mode, paging off, %ebx = hvm_start_info). Test
 * tool only; not part of the guest image.
 *
 *   gcc -O2 -Wall -Wextra -o kvm-run64 kvm-run64.c
 *   ./kvm-run64 GUEST.ELF "CMDLINE" [--ctrl-alt-del SECONDS] [--set1 1] [--pvh 1] [--mem MIB]
 *
 * Machine: RAM from 0 (default 32 MiB), in-kernel irqchip (PIC, IOAPIC,
 * LAPIC) and PIT; COM1 output goes to stdout; a minimal i8042 (ports 0x60,
 * 0x64) that can deliver Ctrl-Alt-Del as scan code set 2 on GSI 1; power
 * port 0x600; boot timer at MMIO 0xC0000000; all other MMIO reads as 0
 * (so every virtio-mmio slot looks empty). Exit status 0 on power-off.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define START_INFO 0x6000  /* hvm_start_info (PVH) */
#define MEMMAP    0x6100   /* its memory map (PVH) */
#define ZERO_PAGE 0x7000   /* boot_params */
#define CMDLINE   0x20000  /* command line */
#define GDT_ADDR  0x500
#define PML4      0x9000   /* identity map of the first 1 GiB */
#define PDPT      0xA000
#define PD        0xB000
#define STACK     0x8ff0

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static volatile sig_atomic_t alarm_fired;
static void on_alarm(int sig)
{
    (void)sig;
    alarm_fired = 1;
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int l)
{
    memset(s, 0, sizeof(*s));
    s->selector = sel;
    s->base = 0;
    s->limit = 0xffffffff;
    s->type = type;
    s->present = 1;
    s->s = 1;
    s->l = l;
    s->db = !l;
    s->g = 1;
}

int main(int argc, char **argv)
{
    double t_start = now_us();
    if (argc < 3) {
        fprintf(stderr, "usage: %s GUEST.ELF CMDLINE [--ctrl-alt-del SECONDS] [--set1 1] [--pvh 1] [--mem MIB]\n",
                argv[0]);
        return 2;
    }
    int cad_after = -1, set1 = 0, pvh = 0;
    uint64_t mem_size = 32ULL << 20;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--ctrl-alt-del"))
            cad_after = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--pvh"))
            pvh = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--set1"))
            set1 = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--mem"))
            mem_size = strtoull(argv[i + 1], 0, 0) << 20;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0)
        perror("KVM_SET_TSS_ADDR (ignored)");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
        perror("KVM_CREATE_PIT2 (ignored)");

    uint8_t *mem = mmap(0, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uint64_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    /* ELF: copy PT_LOAD segments to their physical addresses. */
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0)
        die(argv[1]);
    struct stat st;
    fstat(fd, &st);
    uint8_t *img = mmap(0, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (img == MAP_FAILED)
        die("mmap elf");
    Elf64_Ehdr *eh = (Elf64_Ehdr *)img;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64) {
        fprintf(stderr, "not an x86_64 ELF64\n");
        return 2;
    }
    uint64_t pvh_entry = 0;
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr *ph = (Elf64_Phdr *)(img + eh->e_phoff + i * eh->e_phentsize);
        if (ph->p_type == PT_NOTE) {
            /* notes: {namesz, descsz, type, name (4-aligned), desc (4-aligned)} */
            uint64_t off = ph->p_offset, end = ph->p_offset + ph->p_filesz;
            while (off + 12 <= end) {
                uint32_t *n = (uint32_t *)(img + off);
                uint64_t name = off + 12, desc = name + ((n[0] + 3) & ~3u);
                if (n[2] == 18 && n[0] == 4 && !memcmp(img + name, "Xen", 4) && n[1] >= 4)
                    pvh_entry = *(uint32_t *)(img + desc); /* XEN_ELFNOTE_PHYS32_ENTRY */
                off = desc + ((n[1] + 3) & ~3u);
            }
            continue;
        }
        if (ph->p_type != PT_LOAD)
            continue;
        if (ph->p_paddr + ph->p_memsz > mem_size) {
            fprintf(stderr, "segment outside RAM\n");
            return 2;
        }
        memcpy(mem + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
    }

    /* boot_params: command line and e820 (as vireo-vmm lays them out). */
    uint8_t *bp = mem + ZERO_PAGE;
    strncpy((char *)mem + CMDLINE, argv[2], 4095);
    *(uint32_t *)(bp + 0x228) = CMDLINE;       /* hdr.cmd_line_ptr */
    *(uint16_t *)(bp + 0x1fe) = 0xAA55;        /* hdr.boot_flag */
    *(uint32_t *)(bp + 0x202) = 0x53726448;    /* hdr.header "HdrS" */
    struct __attribute__((packed)) e820 { uint64_t addr, size; uint32_t type; } *e = (void *)(bp + 0x2d0);
    e[0] = (struct e820){ 0, 0x9fc00, 1 };
    e[1] = (struct e820){ 0x9fc00, 0x100000 - 0x9fc00, 2 };
    e[2] = (struct e820){ 0x100000, mem_size - 0x100000, 1 };
    bp[0x1e8] = 3;                             /* e820_entries */

    /* hvm_start_info for the PVH entry: same command line and map. */
    uint8_t *si = mem + START_INFO;
    *(uint32_t *)(si + 0) = 0x336ec578;        /* magic */
    *(uint32_t *)(si + 4) = 1;                 /* version */
    *(uint64_t *)(si + 24) = CMDLINE;          /* cmdline_paddr */
    *(uint64_t *)(si + 40) = MEMMAP;           /* memmap_paddr */
    *(uint32_t *)(si + 48) = 3;                /* memmap_entries */
    struct hvm_memmap { uint64_t addr, size; uint32_t type, reserved; } *mm = (void *)(mem + MEMMAP);
    mm[0] = (struct hvm_memmap){ 0, 0x9fc00, 1, 0 };
    mm[1] = (struct hvm_memmap){ 0x9fc00, 0x100000 - 0x9fc00, 2, 0 };
    mm[2] = (struct hvm_memmap){ 0x100000, mem_size - 0x100000, 1, 0 };

    /* GDT and 1 GiB identity map with 2 MiB pages. */
    uint64_t *gdt = (uint64_t *)(mem + GDT_ADDR);
    gdt[0] = 0;
    gdt[1] = 0x00af9b000000ffffULL; /* 0x08: 64-bit code */
    gdt[2] = 0x00cf93000000ffffULL; /* 0x10: data */
    gdt[3] = 0x00cf9b000000ffffULL; /* 0x18: 32-bit code (PVH) */
    *(uint64_t *)(mem + PML4) = PDPT | 3;
    *(uint64_t *)(mem + PDPT) = PD | 3;
    for (uint64_t i = 0; i < 512; i++)
        ((uint64_t *)(mem + PD))[i] = (i << 21) | 0x83;

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = { .c.nent = 256 };
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) == 0 && ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0)
        perror("KVM_SET_CPUID2 (ignored)");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    struct kvm_sregs sr;
    if (ioctl(vcpu, KVM_GET_SREGS, &sr) < 0)
        die("KVM_GET_SREGS");
    sr.gdt.base = GDT_ADDR;
    sr.gdt.limit = 4 * 8 - 1;
    seg(&sr.ds, 0x10, 3, 0);
    sr.es = sr.fs = sr.gs = sr.ss = sr.ds;
    struct kvm_regs r = { .rsp = STACK, .rflags = 2 };
    if (pvh) {
        if (!pvh_entry) {
            fprintf(stderr, "no XEN_ELFNOTE_PHYS32_ENTRY note\n");
            return 2;
        }
        seg(&sr.cs, 0x18, 11, 0);  /* flat 32-bit code */
        sr.cr3 = 0;
        sr.cr4 = 0;
        sr.cr0 = 0x11;             /* ET | PE: protected mode, no paging */
        sr.efer = 0;
        r.rip = pvh_entry;
        r.rbx = START_INFO;
        fprintf(stderr, "[harness] PVH entry 0x%llx\n", (unsigned long long)pvh_entry);
    } else {
        seg(&sr.cs, 0x08, 11, 1);  /* 64-bit code */
        sr.cr3 = PML4;
        sr.cr4 = 0x20;             /* PAE */
        sr.cr0 = 0x80000011;       /* PG | ET | PE */
        sr.efer = 0x500;           /* LME | LMA */
        r.rip = eh->e_entry;
        r.rsi = ZERO_PAGE;
    }
    if (ioctl(vcpu, KVM_SET_SREGS, &sr) < 0)
        die("KVM_SET_SREGS");
    if (ioctl(vcpu, KVM_SET_REGS, &r) < 0)
        die("KVM_SET_REGS");

    struct sigaction sa = { .sa_handler = on_alarm };
    sigaction(SIGALRM, &sa, 0);
    if (cad_after >= 0) {
        struct itimerval it = { .it_value = { .tv_sec = cad_after, .tv_usec = 1000 } };
        setitimer(ITIMER_REAL, &it, 0);
    } else {
        alarm(20); /* give up after 20 s */
    }

    fprintf(stderr, "[harness] first KVM_RUN at %.0f us after harness start\n", now_us() - t_start);
    uint8_t kbd[16];
    int kbd_n = 0, kbd_pos = 0, cad_sent = 0;
    for (;;) {
        int rc = ioctl(vcpu, KVM_RUN, 0);
        if (rc < 0 && errno == EINTR) {
            if (alarm_fired && cad_after >= 0 && !cad_sent) {
                alarm_fired = 0;
                cad_sent = 1;
                static const uint8_t seq2[] = { 0x14, 0x11, 0xE0, 0x71 }; /* set 2 */
                static const uint8_t seq1[] = { 0x1D, 0x38, 0xE0, 0x53 }; /* set 1 */
                memcpy(kbd, set1 ? seq1 : seq2, 4);
                kbd_n = 4;
                kbd_pos = 0;
                fprintf(stderr, "[harness] Ctrl-Alt-Del: set-%d bytes queued, GSI 1 pulsed\n", set1 ? 1 : 2);
                struct kvm_irq_level irq = { .irq = 1, .level = 1 };
                ioctl(vm, KVM_IRQ_LINE, &irq);
                irq.level = 0;
                ioctl(vm, KVM_IRQ_LINE, &irq);
                alarm(20);
                continue;
            }
            if (alarm_fired) {
                fprintf(stderr, "[harness] timeout\n");
                return 1;
            }
            continue;
        }
        if (rc < 0)
            die("KVM_RUN");
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint16_t port = run->io.port;
            for (uint32_t c = 0; c < run->io.count; c++, data += run->io.size) {
                if (run->io.direction == KVM_EXIT_IO_OUT) {
                    if (port == 0x3f8) {
                        fputc(*data, stdout);
                        fflush(stdout);
                    } else if (port == 0x600) {
                        fprintf(stderr, "[harness] power port 0x600 <- 0x%02x (%s) after %.0f us\n", *data,
                                *data == 0x34 ? "power-off" : "?", now_us() - t_start);
                        return *data == 0x34 ? 0 : 1;
                    }
                } else {
                    uint8_t v = 0;
                    if (port == 0x3fd)
                        v = 0x60; /* LSR: THR empty, transmitter empty */
                    else if (port == 0x64)
                        v = kbd_pos < kbd_n ? 1 : 0; /* output buffer full? */
                    else if (port == 0x60)
                        v = kbd_pos < kbd_n ? kbd[kbd_pos++] : 0;
                    memset(data, v, run->io.size);
                }
            }
            break;
        }
        case KVM_EXIT_MMIO:
            if (run->mmio.is_write) {
                if (run->mmio.phys_addr == 0xC0000000ULL)
                    fprintf(stderr, "[harness] boot timer: byte %u at %.0f us after harness start\n",
                            run->mmio.data[0], now_us() - t_start);
            } else {
                memset(run->mmio.data, 0, sizeof(run->mmio.data));
            }
            break;
        case KVM_EXIT_HLT:
            fprintf(stderr, "[harness] HLT exit (no in-kernel irqchip?)\n");
            return 1;
        case KVM_EXIT_SHUTDOWN:
            fprintf(stderr, "[harness] triple fault / shutdown\n");
            return 1;
        case KVM_EXIT_INTERNAL_ERROR:
            fprintf(stderr, "[harness] internal error, suberror %u\n", run->internal.suberror);
            return 1;
        default:
            fprintf(stderr, "[harness] unexpected exit %u\n", run->exit_reason);
            return 1;
        }
    }
}
