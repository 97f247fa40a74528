/*
 * Vireo test guest: entry points, page tables, GDT and interrupt stubs.
 *
 * Two ways in:
 *   entry64   - ELF e_entry, Linux 64-bit boot protocol: long mode, paging on
 *               (identity map of at least the first 1 GiB), %rsi = boot_params.
 *   pvh_entry - Xen PVH (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode,
 *               paging off, %ebx = struct hvm_start_info.
 * Both switch to our own identity map of the first 4 GiB with 2 MiB pages (so
 * the boot timer at 0xC0000000, virtio-mmio at 0xFEB00000, the IOAPIC at
 * 0xFEC00000 and the LAPIC at 0xFEE00000 are reachable), write the boot
 * timer, zero .bss, load our GDT and call guest_main(info_pointer,
 * boot_kind) on our own stack.
 *
 * The page tables are static data built by the assembler, not at run time:
 * under an instruction-emulating hypervisor (PVM here runs this guest at
 * roughly a microsecond per instruction) a 2048-entry loop costs ~12 ms.
 */

#define BOOT_TIMER_ADDR  0xC0000000 /* MMIO boot timer (Firecracker convention) */
#define BOOT_TIMER_MAGIC 123        /* the byte that says "guest is up" */

#define BOOT_KIND_LINUX64 0
#define BOOT_KIND_PVH     1

#define SEL_CODE64 0x08            /* GDT selector: 64-bit ring-0 code */
#define SEL_DATA   0x10            /* GDT selector: flat ring-0 data */

#define MSR_EFER   0xC0000080      /* IA32_EFER */
#define EFER_LME   0x100           /* EFER bit 8: long mode enable */
#define CR0_PE     0x00000001      /* CR0 bit 0: protected mode */
#define CR0_PG     0x80000000      /* CR0 bit 31: paging */
#define CR4_PAE    0x20            /* CR4 bit 5: physical address extension */

#define PTE_P_RW   0x3             /* present | writable */
#define PDE_2M     0x83            /* present | writable | page size (2 MiB) */
#define PDE_UC     0x18            /* PWT | PCD: uncached, for the MMIO GiB */

/* ------------------------------------------------------------------ */
/* ELF note read by PVH loaders (QEMU, linux-loader): name "Xen",      */
/* type 18 = XEN_ELFNOTE_PHYS32_ENTRY, descriptor = 32-bit entry       */
/* address (stored as 8 bytes like Linux does; readers use the low 4). */
    .section .note.Xen, "a"
    .balign 4
    .long 4                         /* n_namesz: "Xen\0" */
    .long 8                         /* n_descsz */
    .long 18                        /* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry

/* ------------------------------------------------------------------ */
    .section .text.entry, "ax"

/* 32-bit PVH entry. */
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    cld
    movl %ebx, %ebp                 /* keep hvm_start_info pointer */

    /* Paging is off: the boot timer's physical address is usable as is. */
    movb $BOOT_TIMER_MAGIC, BOOT_TIMER_ADDR

    /* Our GDT; reload data segments with our flat data selector. */
    lgdt gdt_ptr
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs

    /* Enter long mode: PAE, CR3, EFER.LME, then paging. */
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $SEL_CODE64, $pvh_long

    .code64
pvh_long:
    movq $stack_top, %rsp
    call zero_bss
    movl %ebp, %edi                 /* arg 0: hvm_start_info (zero-extended) */
    movl $BOOT_KIND_PVH, %esi       /* arg 1: boot kind */
    jmp enter_c

/* 64-bit ELF entry (Linux 64-bit boot protocol). */
    .globl entry64
entry64:
    cli
    cld
    movq %rsi, %rbp                 /* keep boot_params pointer */
    movq $stack_top, %rsp           /* our stack (the loader's may be none) */

    movq $pml4, %rax
    movq %rax, %cr3                 /* switch to our page tables */
    movl $BOOT_TIMER_ADDR, %eax     /* above 2 GiB: not a disp32 */
    movb $BOOT_TIMER_MAGIC, (%rax)  /* now mapped: boot timer */

    lgdt gdt_ptr
    pushq $SEL_CODE64               /* far return to reload CS */
    leaq 4f(%rip), %rax
    pushq %rax
    lretq
4:  movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    call zero_bss
    movq %rbp, %rdi                 /* arg 0: boot_params */
    movl $BOOT_KIND_LINUX64, %esi   /* arg 1: boot kind */

enter_c:
    call guest_main
5:  cli
    hlt
    jmp 5b

/* Zero .bss (statics; the stack lives in its own section, so this is
 * called on our stack). Clobbers %rax, %rcx, %rdi. */
zero_bss:
    movq $_bss_start, %rdi
    movq $_bss_end, %rcx
    subq %rdi, %rcx
    shrq $3, %rcx                   /* .bss is 4 KiB aligned at both ends */
    xorl %eax, %eax
    rep stosq
    ret

/* ------------------------------------------------------------------ */
/* Interrupt stubs: one 16-byte stub per vector. Vectors that push an   */
/* error code (8, 10-14, 17, 21, 29, 30) do not get a dummy one.        */
    .altmacro
    .macro isr_stub n
    .balign 16
    .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    pushq $0                        /* dummy error code */
    .endif
    pushq $\n                       /* vector number */
    jmp isr_common
    .endm

    .text
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    isr_stub %vec
    .set vec, vec + 1
    .endr

/* Save the caller-saved registers (C code is built general-registers
 * only, so no SSE state), call isr_handler(frame), restore, iretq.
 * 5 CPU words + error + vector + 9 registers = 16 words: %rsp stays
 * 16-byte aligned at the call (the CPU aligns it before pushing). */
isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    cld
    movq %rsp, %rdi
    call isr_handler
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp                  /* drop vector and error code */
    iretq

/* ------------------------------------------------------------------ */
    .data
    .balign 16
gdt:
    .quad 0                         /* null descriptor */
    .quad 0x00AF9A000000FFFF        /* 0x08: 64-bit code, ring 0 (L=1) */
    .quad 0x00CF92000000FFFF        /* 0x10: flat data, ring 0 */
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt                       /* 32-bit lgdt reads the low 4 bytes */

/* Identity map of 0..4 GiB: PML4[0] -> PDPT, PDPT[0..3] -> 4 page
 * directories of 512 x 2 MiB pages. The last GiB (MMIO: boot timer,
 * virtio-mmio, IOAPIC, LAPIC) is mapped uncached. */
    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + PTE_P_RW
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + PTE_P_RW
    .quad pd + 0x1000 + PTE_P_RW
    .quad pd + 0x2000 + PTE_P_RW
    .quad pd + 0x3000 + PTE_P_RW
    .fill 508, 8, 0
pd:
    .set pa, 0
    .rept 1536                      /* 0 .. 3 GiB: RAM, write-back */
    .quad pa + PDE_2M
    .set pa, pa + 0x200000
    .endr
    .rept 512                       /* 3 .. 4 GiB: MMIO, uncached */
    .quad pa + PDE_2M + PDE_UC
    .set pa, pa + 0x200000
    .endr

    .section .stack, "aw", @nobits
    .balign 16
stack:  .skip 16384                 /* boot and interrupt stack (not zeroed) */
stack_top:

    .section .note.GNU-stack, "", @progbits
