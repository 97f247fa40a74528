/* Vireo test guest: boot information, interrupts, keyboard and idle loop. */
#include "guest.h"

#define BOOT_KIND_LINUX64 0
#define BOOT_KIND_PVH 1

/* Linux boot_params ("zero page") offsets */
#define BP_EXT_CMD_LINE_PTR 0x0c8 /* u32: high half of cmd_line_ptr */
#define BP_E820_ENTRIES     0x1e8 /* u8 */
#define BP_CMD_LINE_PTR     0x228 /* u32: hdr.cmd_line_ptr */
#define BP_E820_TABLE       0x2d0 /* 128 x {u64 addr, u64 size, u32 type} */
#define BP_E820_MAX         128

/* struct hvm_start_info offsets (Xen PVH) */
#define HVM_MAGIC_VALUE     0x336ec578
#define HVM_MAGIC           0   /* u32 */
#define HVM_VERSION         4   /* u32 */
#define HVM_CMDLINE_PADDR   24  /* u64 */
#define HVM_MEMMAP_PADDR    40  /* u64, version >= 1 */
#define HVM_MEMMAP_ENTRIES  48  /* u32, version >= 1 */

#define E820_RAM 1

/* interrupt vectors */
#define VEC_PIC_BASE  0x20  /* 8259: IRQ0..15 -> 0x20..0x2f */
#define VEC_IOAPIC    0x30  /* IOAPIC pin p -> 0x30 + p */
#define VEC_SPURIOUS  0xff  /* LAPIC spurious vector */

/* 8259 PIC ports */
#define PIC1_CMD  0x20
#define PIC1_DATA 0x21
#define PIC2_CMD  0xA0
#define PIC2_DATA 0xA1
/* 8254 PIT ports */
#define PIT_CH0   0x40
#define PIT_CMD   0x43
#define PIT_HZ    1193182

/* LAPIC registers (offsets from its base) */
#define LAPIC_ID   0x020
#define LAPIC_TPR  0x080
#define LAPIC_EOI  0x0b0
#define LAPIC_SVR  0x0f0
#define LAPIC_LINT0 0x350
#define LAPIC_LINT1 0x360
#define MSR_APIC_BASE 0x1b  /* IA32_APIC_BASE */

extern char _end[];
extern char isr_stubs[];

/* ------------------------------------------------------------------ */
/* memory */

static uint64_t heap_next, heap_limit;
/* End of the RAM region (e820 type 1) holding the image; 0 if unknown. */
static uint64_t ram_low_end;

/* Bump allocator over the RAM after the image. Memory is not zeroed unless
 * asked (after an in-place reset it may hold old contents). */
void *heap_alloc(size_t size, size_t align, int zero)
{
    uint64_t p = (heap_next + align - 1) & ~(uint64_t)(align - 1);
    if (p + size > heap_limit)
        return 0;
    heap_next = p + size;
    if (zero)
        memset((void *)p, 0, size);
    return (void *)p;
}

/* Ends the allocator: returns the first free page after it (later
 * allocations fail) and in *end the end of the RAM the image is in (below
 * 3 GiB), so the caller may own [start, *end). */
uint64_t heap_seal(uint64_t *end)
{
    uint64_t start = (heap_next + 4095) & ~4095ULL;
    heap_next = start;
    heap_limit = start;
    uint64_t e = ram_low_end ? ram_low_end : (16ULL << 20);
    if (e > (3ULL << 30))
        e = 3ULL << 30;
    e &= ~4095ULL;
    *end = e > start ? e : start;
    return start;
}

/* ------------------------------------------------------------------ */
/* boot information */

static char cmdline[2048];
static uint64_t mem_kib;
static int mem_entries = -1; /* -1: no memory map */

static uint32_t rd32(uint64_t a) { return *(volatile uint32_t *)a; }
static uint64_t rd64(uint64_t a) { return *(volatile uint64_t *)a; }

static void copy_cmdline(uint64_t p)
{
    cmdline[0] = 0;
    if (!p || p >= (4ULL << 30))
        return;
    const char *s = (const char *)p;
    size_t i = 0;
    for (; i < sizeof(cmdline) - 1 && s[i]; i++)
        cmdline[i] = (s[i] == '\n' || s[i] == '\r') ? ' ' : s[i];
    cmdline[i] = 0;
}

static void add_region(uint64_t addr, uint64_t size, uint32_t type)
{
    if (type != E820_RAM)
        return;
    mem_kib += size / 1024;
    if (addr <= 0x100000 && addr + size > 0x100000)
        ram_low_end = addr + size;
}

static const char *read_boot_info(uint64_t info, int kind)
{
    if (info == 0 || info >= (4ULL << 30))
        return "no boot information pointer";
    if (kind == BOOT_KIND_PVH) {
        if (rd32(info + HVM_MAGIC) != HVM_MAGIC_VALUE)
            return "bad hvm_start_info magic";
        copy_cmdline(rd64(info + HVM_CMDLINE_PADDR));
        if (rd32(info + HVM_VERSION) >= 1) {
            uint64_t map = rd64(info + HVM_MEMMAP_PADDR);
            uint32_t n = rd32(info + HVM_MEMMAP_ENTRIES);
            if (map && map < (4ULL << 30) && n && n <= 1024) {
                mem_entries = (int)n;
                for (uint32_t i = 0; i < n; i++) /* {u64 addr, u64 size, u32 type, u32 rsvd} */
                    add_region(rd64(map + 24 * i), rd64(map + 24 * i + 8), rd32(map + 24 * i + 16));
            }
        }
    } else {
        uint64_t p = rd32(info + BP_CMD_LINE_PTR) | ((uint64_t)rd32(info + BP_EXT_CMD_LINE_PTR) << 32);
        copy_cmdline(p);
        uint32_t n = *(volatile uint8_t *)(info + BP_E820_ENTRIES);
        if (n > BP_E820_MAX)
            n = BP_E820_MAX;
        if (n) {
            mem_entries = (int)n;
            for (uint32_t i = 0; i < n; i++) /* packed {u64 addr, u64 size, u32 type} */
                add_region(rd64(info + BP_E820_TABLE + 20 * i),
                           rd64(info + BP_E820_TABLE + 20 * i + 8),
                           rd32(info + BP_E820_TABLE + 20 * i + 16));
        }
    }
    return 0;
}

/* Is `opt` (e.g. "vireo.echo=1") one of the space-separated words? */
static int has_option(const char *opt)
{
    size_t n = strlen(opt);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *w = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - w) == n && memcmp(w, opt, n) == 0)
            return 1;
    }
    return 0;
}

/* The value of the word starting with `prefix` (e.g. "vireo.netbench="),
 * or 0 if there is none. The value ends at the next space or NUL. */
static const char *option_value(const char *prefix)
{
    size_t n = strlen(prefix);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *w = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - w) >= n && memcmp(w, prefix, n) == 0)
            return w + n;
    }
    return 0;
}

/* A decimal number at *s (advanced past it); 0 if there are no digits. */
static uint32_t parse_u32(const char **s)
{
    uint64_t v = 0;
    while (**s >= '0' && **s <= '9') {
        v = v * 10 + (uint64_t)(**s - '0');
        if (v > 0xffffffffULL)
            v = 0xffffffffULL;
        (*s)++;
    }
    return (uint32_t)v;
}

/* vireo.netbench=FRAMES[,SIZE]: SIZE is the Ethernet frame without FCS,
 * 60..1514 (default 1514). */
#define NETBENCH_SIZE_MIN 60
#define NETBENCH_SIZE_MAX 1514
static void netbench_option(uint32_t *frames, uint32_t *size)
{
    *frames = 0;
    *size = NETBENCH_SIZE_MAX;
    const char *v = option_value("vireo.netbench=");
    if (!v)
        return;
    *frames = parse_u32(&v);
    if (*v == ',') {
        v++;
        uint32_t s = parse_u32(&v);
        if (s < NETBENCH_SIZE_MIN)
            s = NETBENCH_SIZE_MIN;
        if (s > NETBENCH_SIZE_MAX)
            s = NETBENCH_SIZE_MAX;
        *size = s;
    }
}

/* vireo.blkbench=MIB[,KIB[,DEPTH]]: MiB to write and read back, request
 * size in KiB (default 128), requests in flight (default 16). */
static void blkbench_option(uint32_t *mib, uint32_t *kib, uint32_t *depth)
{
    *mib = 0;
    *kib = 128;
    *depth = 16;
    const char *v = option_value("vireo.blkbench=");
    if (!v)
        return;
    *mib = parse_u32(&v);
    if (*v == ',') {
        v++;
        *kib = parse_u32(&v);
        if (*v == ',') {
            v++;
            *depth = parse_u32(&v);
        }
    }
}

/* ------------------------------------------------------------------ */
/* power */

static void power_off(void)
{
    outb(POWER_PORT, POWER_OFF_VALUE); /* VMM: ACPI S5 via sleep control */
    for (;;)
        __asm__ volatile("cli; hlt"); /* nothing left to do */
}

/* ------------------------------------------------------------------ */
/* interrupts */

struct idt_entry {
    uint16_t off_lo;
    uint16_t sel;
    uint8_t ist;
    uint8_t type;
    uint16_t off_mid;
    uint32_t off_hi;
    uint32_t zero;
} __attribute__((packed));

struct frame {
    uint64_t r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss;
};

static struct idt_entry idt[256] __attribute__((aligned(16)));
static int irq_mode;             /* 0: IOAPIC, 1: PIC + PIT tick */
static uint64_t lapic_base = LAPIC_DEFAULT;
static volatile int irq_pending;
static volatile uint32_t pit_ticks; /* IRQ0 interrupts seen (tick mode) */

#define KBD_RING 256
static volatile uint8_t kbd_ring[KBD_RING];
static volatile uint32_t kbd_head, kbd_tail;

static void idt_set(int v)
{
    {
        uint64_t h = (uint64_t)isr_stubs + 16 * (uint64_t)v; /* 16-byte stubs */
        idt[v].off_lo = (uint16_t)h;
        idt[v].sel = 0x08;  /* our 64-bit code selector */
        idt[v].ist = 0;
        idt[v].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
        idt[v].off_mid = (uint16_t)(h >> 16);
        idt[v].off_hi = (uint32_t)(h >> 32);
        idt[v].zero = 0;
    }
}

/* Only the vectors we use get a gate (each costs a dozen instructions,
 * which an emulating hypervisor feels); any other vector finds a
 * not-present gate and turns into a reported #NP (error = vector*8+2). */
static void idt_init(void)
{
    for (int v = 0; v < 32; v++)
        idt_set(v); /* exceptions */
    for (int v = VEC_PIC_BASE; v < VEC_PIC_BASE + 16; v++)
        idt_set(v); /* 8259 */
    for (int v = VEC_IOAPIC; v < VEC_IOAPIC + 24; v++)
        idt_set(v); /* IOAPIC pins */
    idt_set(VEC_SPURIOUS);
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr)); /* load the IDT */
}

static void kbd_drain_to_ring(void)
{
    /* Status bit 0: output buffer full. Bounded: at most 64 bytes. */
    for (int i = 0; i < 64 && (inb(I8042_STATUS) & 1); i++) {
        uint8_t b = inb(I8042_DATA);
        uint32_t h = kbd_head;
        if (h - kbd_tail < KBD_RING) {
            kbd_ring[h % KBD_RING] = b;
            kbd_head = h + 1;
        }
    }
}

static void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(lapic_base + reg, v); }
static uint32_t lapic_read(uint32_t reg) { return mmio_read32(lapic_base + reg); }

static void ioapic_write(uint32_t reg, uint32_t v)
{
    mmio_write32(IOAPIC_BASE, reg);        /* IOREGSEL */
    mmio_write32(IOAPIC_BASE + 0x10, v);   /* IOWIN */
}
static uint32_t ioapic_read(uint32_t reg)
{
    mmio_write32(IOAPIC_BASE, reg);
    return mmio_read32(IOAPIC_BASE + 0x10);
}

void isr_handler(struct frame *f)
{
    uint64_t v = f->vector;
    if (v == 2) { /* NMI (LINT1 or injected): report it, carry on */
        kprintf("VIREO-TEST nmi\n");
        return;
    }
    if (v < 32) {
        uint64_t cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2)); /* faulting address */
        kprintf("VIREO-TEST exception vector=%lu error=0x%lx rip=0x%lx cr2=0x%lx\n", v, f->error,
                f->rip, cr2);
        for (;;)
            __asm__ volatile("cli; hlt"); /* stop here for good */
    }
    if (v == VEC_SPURIOUS)
        return; /* spurious: no EOI */
    if (v >= VEC_PIC_BASE && v < VEC_PIC_BASE + 16) {
        unsigned irq = (unsigned)(v - VEC_PIC_BASE);
        if (irq == 0)
            pit_ticks++;
        if (irq == 1)
            kbd_drain_to_ring();
        if (irq >= 8)
            outb(PIC2_CMD, 0x20); /* non-specific EOI to the slave */
        outb(PIC1_CMD, 0x20);     /* non-specific EOI to the master */
        irq_pending = 1;
        return;
    }
    if (v >= VEC_IOAPIC && v < VEC_IOAPIC + 24) {
        unsigned pin = (unsigned)(v - VEC_IOAPIC);
        if (pin == 1)
            kbd_drain_to_ring();
        else if (pin >= VIRTIO_GSI_BASE)
            virtio_ack_slot((int)pin - VIRTIO_GSI_BASE); /* drops the level */
        lapic_write(LAPIC_EOI, 0);
        irq_pending = 1;
        return;
    }
    /* anything else: acknowledge at the LAPIC in case it came from there */
    lapic_write(LAPIC_EOI, 0);
}

static void pic_init(uint8_t mask1, uint8_t mask2)
{
    outb(PIC1_CMD, 0x11);          /* ICW1: init, ICW4 follows, cascade */
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, VEC_PIC_BASE); /* ICW2: vector base */
    outb(PIC2_DATA, VEC_PIC_BASE + 8);
    outb(PIC1_DATA, 0x04);         /* ICW3: slave on IRQ2 */
    outb(PIC2_DATA, 0x02);         /* ICW3: slave identity 2 */
    outb(PIC1_DATA, 0x01);         /* ICW4: 8086 mode */
    outb(PIC2_DATA, 0x01);
    outb(PIC1_DATA, mask1);        /* OCW1: masks */
    outb(PIC2_DATA, mask2);
}

static void lapic_init(int pic_mode)
{
    uint64_t apic = rdmsr(MSR_APIC_BASE);
    if (!(apic & (1 << 11)))          /* bit 11: APIC global enable */
        wrmsr(MSR_APIC_BASE, apic | (1 << 11));
    lapic_base = apic & 0xFFFFFF000ULL;
    if (!lapic_base)
        lapic_base = LAPIC_DEFAULT;
    lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS); /* software enable */
    lapic_write(LAPIC_TPR, 0);                    /* accept all priorities */
    /* LINT0 as ExtINT lets the 8259 through (virtual wire); masked otherwise */
    lapic_write(LAPIC_LINT0, pic_mode ? 0x700 : 0x10000);
    lapic_write(LAPIC_LINT1, 0x400);              /* NMI */
}

/* ------------------------------------------------------------------ */
/* CPU hot-plug controller (vireo-vmm): the VMM asks for a vCPU to be
 * removed (STA bit 2) or says one was added (bit 1); we answer by ejecting
 * (write 8) or acknowledging (write 2). Application processors are never
 * started here, so there is nothing to take offline first. */

static unsigned cpuhp_count; /* 0: no controller */

static void cpuhp_probe(void)
{
    uint8_t n = inb(CPUHP_PORT + 3);
    cpuhp_count = (n >= 1 && n <= 254) ? n : 0;
}

static void cpuhp_poll(void)
{
    for (unsigned k = 0; k < cpuhp_count; k++) { /* at most one round per vCPU */
        uint8_t p = inb(CPUHP_PORT + 2);
        if (p >= cpuhp_count)
            return; /* 0xFF: nothing pending */
        outb(CPUHP_PORT, p);
        uint8_t st = inb(CPUHP_PORT + 1);
        if (st & 4) {
            outb(CPUHP_PORT + 1, 8);
            kprintf("VIREO-TEST cpu%u: ejected\n", p);
        } else if (st & 2) {
            outb(CPUHP_PORT + 1, 2);
            kprintf("VIREO-TEST cpu%u: plugged\n", p);
        } else {
            return;
        }
    }
}

/* Route pin -> vector 0x30+pin on this CPU. Returns 0 if there is no IOAPIC. */
static int ioapic_init(void)
{
    uint32_t ver = ioapic_read(1); /* IOAPICVER */
    if (ver == 0 || ver == 0xffffffffu)
        return 0;
    unsigned max = (ver >> 16) & 0xff; /* highest redirection entry */
    uint32_t dest = lapic_read(LAPIC_ID) >> 24;
    for (unsigned pin = 0; pin <= max && pin < 24; pin++) {
        uint32_t lo = VEC_IOAPIC + pin;
        int on = 0;
        if (pin == 1) {
            on = 1; /* i8042 keyboard: ISA, edge, active high */
        } else if (pin >= VIRTIO_GSI_BASE && pin <= VIRTIO_GSI_BASE + 15) {
            lo |= 1u << 15; /* virtio-mmio: level triggered, active high */
            on = virtio_slot_present((int)pin - VIRTIO_GSI_BASE);
        } else if (pin == CPUHP_GSI) {
            on = cpuhp_count != 0; /* hot-plug controller: edge, active high */
        }
        if (!on)
            lo |= 1u << 16; /* masked */
        ioapic_write(0x11 + 2 * pin, dest << 24); /* high: destination APIC id */
        ioapic_write(0x10 + 2 * pin, lo);         /* low: vector, mode, mask */
    }
    return 1;
}

static void pit_init_100hz(void)
{
    uint16_t div = PIT_HZ / 100;
    outb(PIT_CMD, 0x34);           /* channel 0, lo/hi byte, mode 2 (rate) */
    outb(PIT_CH0, (uint8_t)div);
    outb(PIT_CH0, (uint8_t)(div >> 8));
}

/* ------------------------------------------------------------------ */
/* keyboard: Ctrl-Alt-Del in scan code set 2 (0x14, 0x11, 0xE0 0x71) or
 * set 1 (0x1D, 0x38, [0xE0] 0x53); breaks are 0xF0 xx (set 2) or
 * code|0x80 (set 1). */

static int kb_e0, kb_f0, kb_ctrl, kb_alt, kb_trace;

static void kbd_byte(uint8_t b)
{
    if (kb_trace)
        kprintf("VIREO-TEST kbd: 0x%02x\n", b);
    if (b == 0xE0) {
        kb_e0 = 1;
        return;
    }
    if (b == 0xF0) {
        kb_f0 = 1;
        return;
    }
    int release = kb_f0;
    kb_f0 = 0;
    kb_e0 = 0;
    if (b & 0x80) { /* set-1 break code */
        release = 1;
        b &= 0x7f;
    }
    switch (b) {
    case 0x14: /* set 2 Ctrl */
    case 0x1D: /* set 1 Ctrl */
        kb_ctrl = !release;
        break;
    case 0x11: /* set 2 Alt */
    case 0x38: /* set 1 Alt */
        kb_alt = !release;
        break;
    case 0x71: /* set 2 Delete (after 0xE0) */
    case 0x53: /* set 1 Delete / keypad Del */
        if (!release && kb_ctrl && kb_alt) {
            kprintf("VIREO-TEST ctrl-alt-del: powering off\n");
            power_off();
        }
        break;
    default:
        break;
    }
}

/* ------------------------------------------------------------------ */

static void idle(void)
{
    int use_tick = has_option("vireo.tick=1");
    /* vireo.counter=1: print an increasing counter twice a second, paced
     * by the PIT (so tick mode), for save/restore tests */
    int counter = has_option("vireo.counter=1");
    uint32_t count = 0, next_tick = 50;
    if (counter)
        use_tick = 1;
    kb_trace = has_option("vireo.kbdtrace=1");
    cpuhp_probe();
    if (!use_tick) {
        pic_init(0xff, 0xff); /* 8259 initialised, everything masked */
        lapic_init(0);
        if (!ioapic_init())
            use_tick = 1;
    }
    if (use_tick) {
        irq_mode = 1;
        lapic_init(1);
        pit_init_100hz();
        pic_init(0xf8, 0xff); /* IRQ0 timer, IRQ1 keyboard, IRQ2 cascade */
    }
    kprintf("VIREO-TEST idle: irq=%s\n", irq_mode ? "pic+pit" : "ioapic");

    /* Stale keyboard bytes and virtio interrupts before enabling. */
    kbd_drain_to_ring();
    for (int s = 0; s < VIRTIO_SLOTS; s++)
        virtio_ack_slot(s);

    for (;;) {
        __asm__ volatile("cli"); /* look at the world with interrupts off */
        irq_pending = 0;
        kbd_drain_to_ring(); /* also catches bytes whose IRQ we missed */
        while (kbd_tail != kbd_head) {
            uint8_t b = kbd_ring[kbd_tail % KBD_RING];
            kbd_tail++;
            kbd_byte(b);
        }
        virtio_poll_all();
        cpuhp_poll();
        if (counter && pit_ticks >= next_tick) {
            kprintf("VIREO-TEST counter %u\n", count++);
            next_tick += 50;
        }
        if (irq_pending || kbd_tail != kbd_head)
            __asm__ volatile("sti"); /* more work arrived: go round */
        else
            __asm__ volatile("sti; hlt"); /* sti shadow: no lost wake-up */
    }
}

void guest_main(uint64_t info, int kind)
{
    /* 1. the boot timer byte was written by entry.S as soon as it was
     * mapped; QEMU's exit device follows it if asked for */
    const char *info_err = read_boot_info(info, kind);
    if (has_option("vireo.debugexit=1"))
        outb(DEBUG_EXIT_PORT, 0); /* QEMU isa-debug-exit: QEMU exits */

    serial_init();
    idt_init();
    kprintf("\nVIREO-TEST-GUEST-READY\n");

    /* 2. command line */
    kprintf("VIREO-TEST cmdline: %s\n", cmdline);

    /* 3. memory */
    if (mem_entries >= 0)
        kprintf("VIREO-TEST memory: %lu KiB in %d e820 entries\n", mem_kib, mem_entries);
    else
        kprintf("VIREO-TEST memory: unknown\n");
    kprintf("VIREO-TEST entry: %s%s%s\n", kind == BOOT_KIND_PVH ? "pvh" : "linux64",
            info_err ? " warning: " : "", info_err ? info_err : "");

    /* heap: from the end of the image, up to 16 MiB (or less RAM) */
    heap_next = ((uint64_t)_end + 4095) & ~4095ULL;
    heap_limit = 16ULL << 20;
    if (mem_entries > 0 && mem_kib && mem_kib * 1024 < heap_limit)
        heap_limit = mem_kib * 1024;

    /* 4. devices */
    const char *vs = option_value("vireo.vsock=");
    if (vs) {
        int mode = 0;
        if (memcmp(vs, "listen:", 7) == 0) {
            mode = 1;
            vs += 7;
        } else if (memcmp(vs, "connect:", 8) == 0) {
            mode = 2;
            vs += 8;
        }
        uint32_t port = parse_u32(&vs);
        if (mode)
            virtio_vsock_option(mode, port);
        else
            kprintf("VIREO-TEST vsock: FAIL bad vireo.vsock option\n");
    }
    uint32_t bench_frames, bench_size;
    netbench_option(&bench_frames, &bench_size);
    int devices = virtio_scan(has_option("vireo.echo=1"), bench_frames, bench_size);
    uint32_t blk_mib, blk_kib, blk_depth;
    blkbench_option(&blk_mib, &blk_kib, &blk_depth);
    if (blk_mib)
        virtio_blk_bench(blk_mib, blk_kib, blk_depth);

    /* vireo.fill=MIB: write a non-zero pattern over MIB MiB of RAM from
     * 16 MiB up (above the heap), so that a snapshot has memory to carry */
    const char *fill = option_value("vireo.fill=");
    if (fill) {
        uint64_t mib = parse_u32(&fill);
        if (mib == 0 || (16 + mib) * 1024 > mem_kib) {
            kprintf("VIREO-TEST fill: FAIL %lu MiB does not fit above 16 MiB\n", mib);
        } else {
            uint64_t *p = (uint64_t *)(16ULL << 20);
            uint64_t n = mib << 17; /* 8-byte words */
            __asm__ volatile("rep stosq"
                             : "+D"(p), "+c"(n)
                             : "a"(0x5649524545494C4CULL)
                             : "memory");
            kprintf("VIREO-TEST fill: %lu MiB\n", mib);
        }
    }

    /* 5. done */
    kprintf("VIREO-TEST-GUEST-DONE devices=%d\n", devices);
    if (has_option("vireo.panic=1")) {
        /* What a panicking kernel does with a pvpanic device, then stop. */
        kprintf("VIREO-TEST panic: reporting through pvpanic\n");
        outb(PVPANIC_PORT, 1);
        for (;;)
            __asm__ volatile("cli; hlt"); /* dead, as after a panic */
    }
    if (has_option("vireo.poweroff=1"))
        power_off();

    /* 6. idle */
    idle();
}
