/* Vireo test guest: COM1 8250 console and a small printf. */
#include "guest.h"

/* 8250 registers, relative to COM1_PORT */
#define UART_THR 0   /* transmit holding (DLAB=0) / divisor low (DLAB=1) */
#define UART_IER 1   /* interrupt enable / divisor high (DLAB=1) */
#define UART_FCR 2   /* FIFO control */
#define UART_LCR 3   /* line control */
#define UART_MCR 4   /* modem control */
#define UART_LSR 5   /* line status */
#define LSR_THRE 0x20 /* transmit holding register empty */

void serial_init(void)
{
    outb(COM1_PORT + UART_IER, 0x00); /* no UART interrupts */
    outb(COM1_PORT + UART_LCR, 0x80); /* DLAB on */
    outb(COM1_PORT + UART_THR, 0x01); /* divisor 1 = 115200 baud */
    outb(COM1_PORT + UART_IER, 0x00);
    outb(COM1_PORT + UART_LCR, 0x03); /* 8 data bits, no parity, 1 stop */
    outb(COM1_PORT + UART_FCR, 0x07); /* enable and clear FIFOs */
    outb(COM1_PORT + UART_MCR, 0x03); /* DTR | RTS */
}

static void serial_putc(char c)
{
    /* Wait for THRE, bounded so that a missing UART cannot hang us. */
    for (unsigned i = 0; i < 100000; i++) {
        if (inb(COM1_PORT + UART_LSR) & LSR_THRE)
            break;
        cpu_relax();
    }
    outb(COM1_PORT + UART_THR, (uint8_t)c);
}

static void put_str(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

static void put_num(uint64_t v, unsigned base, int width, char pad)
{
    char buf[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v && n < (int)sizeof(buf));
    while (n < width--)
        serial_putc(pad);
    while (n)
        serial_putc(buf[--n]);
}

/* Supports %s %c %d %u %x with optional 0/width and l/ll modifiers. */
void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            put_str(s ? s : "(null)");
            break;
        }
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (v < 0) {
                serial_putc('-');
                v = -v;
            }
            put_num((uint64_t)v, 10, width, pad);
            break;
        }
        case 'u':
            put_num(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, width, pad);
            break;
        case 'x':
            put_num(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, width, pad);
            break;
        case '%':
            serial_putc('%');
            break;
        case 0:
            fmt--;
            break;
        default:
            serial_putc('?');
            break;
        }
    }
    va_end(ap);
}

/* String instructions: one instruction for the whole run, which matters
 * when each instruction is emulated. */
void *memset(void *d, int c, size_t n)
{
    void *ret = d;
    uint64_t v = (uint8_t)c * 0x0101010101010101ULL;
    size_t q = n / 8, r = n % 8;
    __asm__ volatile("rep stosq" : "+D"(d), "+c"(q) : "a"(v) : "memory"); /* fill qwords */
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(r) : "a"(v) : "memory"); /* fill the tail */
    return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *ret = d;
    size_t q = n / 8, r = n % 8;
    __asm__ volatile("rep movsq" : "+D"(d), "+S"(s), "+c"(q) : : "memory"); /* copy qwords */
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(r) : : "memory"); /* copy the tail */
    return ret;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *p = a, *q = b;
    /* eight bytes at a time while they match */
    while (n >= 8 && *(const uint64_t *)p == *(const uint64_t *)q) {
        p += 8;
        q += 8;
        n -= 8;
    }
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}
