/* Vireo test guest: virtio-mmio (version 2) drivers for block, net,
 * entropy, balloon and vsock devices, all driven by polling split
 * virtqueues. */
#include "guest.h"

/* virtio-mmio register offsets (virtio 1.x, section 4.2.2) */
#define VM_MAGIC        0x000  /* "virt" = 0x74726976 */
#define VM_VERSION      0x004  /* 2 for virtio 1.x */
#define VM_DEVICE_ID    0x008
#define VM_DEV_FEAT     0x010
#define VM_DEV_FEAT_SEL 0x014
#define VM_DRV_FEAT     0x020
#define VM_DRV_FEAT_SEL 0x024
#define VM_QUEUE_SEL    0x030
#define VM_QUEUE_MAX    0x034
#define VM_QUEUE_NUM    0x038
#define VM_QUEUE_READY  0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS   0x060
#define VM_INT_ACK      0x064
#define VM_STATUS       0x070
#define VM_DESC_LO      0x080
#define VM_DESC_HI      0x084
#define VM_DRIVER_LO    0x090  /* available ring */
#define VM_DRIVER_HI    0x094
#define VM_DEVICE_LO    0x0a0  /* used ring */
#define VM_DEVICE_HI    0x0a4
#define VM_CONFIG_GEN   0x0fc
#define VM_CONFIG       0x100

#define VIRTIO_MAGIC 0x74726976

/* device status bits */
#define ST_ACK         1
#define ST_DRIVER      2
#define ST_DRIVER_OK   4
#define ST_FEATURES_OK 8
#define ST_FAILED      128

/* feature bits */
#define F_VERSION_1   (1ULL << 32)
#define BLK_F_RO      (1ULL << 5)
#define BLK_F_FLUSH   (1ULL << 9)
#define NET_F_MAC     (1ULL << 5)

/* device ids */
#define ID_NET 1
#define ID_BLK 2
#define ID_RNG 4
#define ID_BALLOON 5

/* descriptor flags */
#define DESC_NEXT  1
#define DESC_WRITE 2

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};
struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};
struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];
};

struct vq {
    uint64_t base;      /* device registers */
    uint16_t index;     /* queue index */
    uint16_t size;      /* number of descriptors */
    uint16_t avail_idx; /* our next avail index */
    uint16_t last_used; /* next used index to consume */
    struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
};

static uint64_t slot_base(int slot)
{
    return VIRTIO_MMIO_BASE + (uint64_t)slot * VIRTIO_MMIO_STRIDE;
}

static void set_status(uint64_t b, uint32_t st) { mmio_write32(b + VM_STATUS, st); }

/* Reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK.
 * `want` lists the optional features we can use; VERSION_1 is required.
 * Returns 0 and the negotiated set, or a static reason string. */
static const char *dev_begin(uint64_t b, uint64_t want, uint64_t *got)
{
    set_status(b, 0); /* reset */
    struct deadline d = deadline_ms(1000);
    while (mmio_read32(b + VM_STATUS) != 0)
        if (deadline_passed(&d))
            return "timeout reset";
    set_status(b, ST_ACK);
    set_status(b, ST_ACK | ST_DRIVER);
    mmio_write32(b + VM_DEV_FEAT_SEL, 0);
    uint64_t feat = mmio_read32(b + VM_DEV_FEAT);
    mmio_write32(b + VM_DEV_FEAT_SEL, 1);
    feat |= (uint64_t)mmio_read32(b + VM_DEV_FEAT) << 32;
    if (!(feat & F_VERSION_1)) {
        set_status(b, ST_FAILED);
        return "no VIRTIO_F_VERSION_1";
    }
    uint64_t drv = feat & (want | F_VERSION_1);
    mmio_write32(b + VM_DRV_FEAT_SEL, 0);
    mmio_write32(b + VM_DRV_FEAT, (uint32_t)drv);
    mmio_write32(b + VM_DRV_FEAT_SEL, 1);
    mmio_write32(b + VM_DRV_FEAT, (uint32_t)(drv >> 32));
    set_status(b, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
    if (!(mmio_read32(b + VM_STATUS) & ST_FEATURES_OK)) {
        set_status(b, ST_FAILED);
        return "features not accepted";
    }
    *got = drv;
    return 0;
}

static void dev_ready(uint64_t b)
{
    set_status(b, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

static void dev_fail(uint64_t b)
{
    set_status(b, ST_FAILED);
}

/* Set up split virtqueue `index` with at most `want` entries. */
static const char *vq_setup(uint64_t b, uint16_t index, uint16_t want, struct vq *q)
{
    mmio_write32(b + VM_QUEUE_SEL, index);
    if (mmio_read32(b + VM_QUEUE_READY))
        return "queue already ready";
    uint32_t max = mmio_read32(b + VM_QUEUE_MAX);
    if (max == 0)
        return "queue missing";
    uint32_t n = 1;
    while (n * 2 <= max && n * 2 <= want)
        n *= 2;
    q->base = b;
    q->index = index;
    q->size = (uint16_t)n;
    q->avail_idx = 0;
    q->last_used = 0;
    q->desc = heap_alloc(16 * n, 4096, 1);
    q->avail = heap_alloc(6 + 2 * n, 4096, 1);
    q->used = heap_alloc(6 + 8 * n, 4096, 1);
    if (!q->desc || !q->avail || !q->used)
        return "out of memory";
    mmio_write32(b + VM_QUEUE_NUM, n);
    uint64_t a = (uint64_t)q->desc;
    mmio_write32(b + VM_DESC_LO, (uint32_t)a);
    mmio_write32(b + VM_DESC_HI, (uint32_t)(a >> 32));
    a = (uint64_t)q->avail;
    mmio_write32(b + VM_DRIVER_LO, (uint32_t)a);
    mmio_write32(b + VM_DRIVER_HI, (uint32_t)(a >> 32));
    a = (uint64_t)q->used;
    mmio_write32(b + VM_DEVICE_LO, (uint32_t)a);
    mmio_write32(b + VM_DEVICE_HI, (uint32_t)(a >> 32));
    mmio_write32(b + VM_QUEUE_READY, 1);
    return 0;
}

/* Make descriptor chain `head` available (no notify). */
static void vq_push(struct vq *q, uint16_t head)
{
    q->avail->ring[q->avail_idx % q->size] = head;
    barrier();
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
}

static void vq_notify(struct vq *q)
{
    mfence();
    mmio_write32(q->base + VM_QUEUE_NOTIFY, q->index);
}

/* Take one used element if there is one. */
static int vq_pop(struct vq *q, uint32_t *id, uint32_t *len)
{
    if (q->used->idx == q->last_used)
        return 0;
    barrier();
    volatile struct vring_used_elem *e = &q->used->ring[q->last_used % q->size];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}

/* Wait (bounded) for one used element. */
static int vq_wait(struct vq *q, uint32_t *id, uint32_t *len)
{
    struct deadline d = deadline_ms(5000);
    while (!vq_pop(q, id, len)) {
        if (deadline_passed(&d))
            return 0;
        cpu_relax();
    }
    return 1;
}

static uint32_t config_read32(uint64_t b, uint32_t off)
{
    return mmio_read32(b + VM_CONFIG + off);
}

/* ------------------------------------------------------------------ */
/* block */

#define BLK_T_IN    0
#define BLK_T_OUT   1
#define BLK_T_FLUSH 4
#define BLK_S_OK    0

struct blk_req_hdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static int blkbench_slot = -1; /* the first writable block device (blkbench) */

struct blk_state {
    struct vq q;
    struct blk_req_hdr *hdr;
    uint8_t *data;
    volatile uint8_t *status;
};

/* One request: header, optional 512-byte data, status. Returns the status
 * byte, or -1 on timeout. */
static int blk_request(struct blk_state *s, uint32_t type, uint64_t sector)
{
    struct vq *q = &s->q;
    s->hdr->type = type;
    s->hdr->reserved = 0;
    s->hdr->sector = sector;
    *s->status = 0xff;
    q->desc[0].addr = (uint64_t)s->hdr;
    q->desc[0].len = sizeof(struct blk_req_hdr);
    q->desc[0].flags = DESC_NEXT;
    if (type == BLK_T_FLUSH) {
        q->desc[0].next = 2;
    } else {
        q->desc[0].next = 1;
        q->desc[1].addr = (uint64_t)s->data;
        q->desc[1].len = 512;
        q->desc[1].flags = DESC_NEXT | (type == BLK_T_IN ? DESC_WRITE : 0);
        q->desc[1].next = 2;
    }
    q->desc[2].addr = (uint64_t)s->status;
    q->desc[2].len = 1;
    q->desc[2].flags = DESC_WRITE;
    q->desc[2].next = 0;
    vq_push(q, 0);
    vq_notify(q);
    uint32_t id, len;
    if (!vq_wait(q, &id, &len))
        return -1;
    return *s->status;
}

/* The sector pattern: "VIREO-TEST-SECTOR", then byte i holds i & 0xff
 * (built eight bytes at a time). */
static void fill_pattern(uint8_t *p)
{
    static const char tag[] = "VIREO-TEST-SECTOR";
    uint64_t *q = (uint64_t *)p;
    for (int k = 0; k < 64; k++)
        q[k] = 0x0706050403020100ULL + (uint64_t)(k & 31) * 0x0808080808080808ULL; /* no carries */
    memcpy(p, tag, sizeof(tag) - 1);
}

static void blk_run(int slot, int n)
{
    uint64_t b = slot_base(slot);
    uint64_t feat = 0;
    const char *err = dev_begin(b, BLK_F_RO | BLK_F_FLUSH, &feat);
    if (err) {
        kprintf("VIREO-TEST blk%d: FAIL %s\n", n, err);
        return;
    }
    struct blk_state s;
    err = vq_setup(b, 0, 8, &s.q);
    if (err) {
        dev_fail(b);
        kprintf("VIREO-TEST blk%d: FAIL %s\n", n, err);
        return;
    }
    uint8_t *page = heap_alloc(4096, 4096, 0);
    if (!page) {
        dev_fail(b);
        kprintf("VIREO-TEST blk%d: FAIL out of memory\n", n);
        return;
    }
    s.hdr = (struct blk_req_hdr *)page;
    s.status = page + 64;
    s.data = page + 512;
    dev_ready(b);

    /* capacity: u64 at config offset 0, read consistently */
    uint64_t cap;
    uint32_t gen;
    int tries = 0;
    do {
        gen = mmio_read32(b + VM_CONFIG_GEN);
        cap = config_read32(b, 0) | ((uint64_t)config_read32(b, 4) << 32);
    } while (gen != mmio_read32(b + VM_CONFIG_GEN) && ++tries < 10);

    if (feat & BLK_F_RO) {
        fill_pattern(s.data);
        int st = blk_request(&s, BLK_T_OUT, 1);
        if (st < 0) {
            kprintf("VIREO-TEST blk%d: capacity=%lu readonly FAIL timeout write\n", n, cap);
            return;
        }
        if (st == BLK_S_OK) {
            kprintf("VIREO-TEST blk%d: capacity=%lu readonly FAIL write not refused\n", n, cap);
            return;
        }
        memset(s.data, 0, 512);
        st = blk_request(&s, BLK_T_IN, 0);
        if (st != BLK_S_OK) {
            kprintf("VIREO-TEST blk%d: capacity=%lu readonly write=refused FAIL read status %d\n",
                    n, cap, st);
            return;
        }
        kprintf("VIREO-TEST blk%d: capacity=%lu readonly write=refused read=ok\n", n, cap);
        return;
    }

    if (cap < 2) {
        kprintf("VIREO-TEST blk%d: capacity=%lu FAIL disk smaller than 2 sectors\n", n, cap);
        return;
    }
    if (blkbench_slot < 0)
        blkbench_slot = slot;
    fill_pattern(s.data);
    int st = blk_request(&s, BLK_T_OUT, 1);
    if (st != BLK_S_OK) {
        kprintf("VIREO-TEST blk%d: capacity=%lu FAIL write status %d\n", n, cap, st);
        return;
    }
    memset(s.data, 0, 512);
    st = blk_request(&s, BLK_T_IN, 1);
    if (st != BLK_S_OK) {
        kprintf("VIREO-TEST blk%d: capacity=%lu write=ok FAIL read status %d\n", n, cap, st);
        return;
    }
    uint8_t expect[512];
    fill_pattern(expect);
    if (memcmp(expect, s.data, 512) != 0) {
        kprintf("VIREO-TEST blk%d: capacity=%lu write=ok read=ok FAIL verify mismatch\n", n, cap);
        return;
    }
    const char *flush = "unsupported";
    if (feat & BLK_F_FLUSH) {
        st = blk_request(&s, BLK_T_FLUSH, 0);
        if (st != BLK_S_OK) {
            kprintf("VIREO-TEST blk%d: capacity=%lu write=ok read=ok verify=ok FAIL flush status %d\n",
                    n, cap, st);
            return;
        }
        flush = "ok";
    }
    kprintf("VIREO-TEST blk%d: capacity=%lu write=ok read=ok verify=ok flush=%s\n", n, cap, flush);
}

/* ------------------------------------------------------------------ */
/* entropy */

static void rng_run(int slot, int n)
{
    uint64_t b = slot_base(slot);
    uint64_t feat = 0;
    const char *err = dev_begin(b, 0, &feat);
    struct vq q;
    if (!err)
        err = vq_setup(b, 0, 4, &q);
    uint8_t *buf = heap_alloc(64, 64, 1);
    if (!err && !buf)
        err = "out of memory";
    if (err) {
        dev_fail(b);
        kprintf("VIREO-TEST rng%d: FAIL %s\n", n, err);
        return;
    }
    dev_ready(b);
    uint32_t got = 0;
    for (int tries = 0; got < 64 && tries < 64; tries++) {
        q.desc[0].addr = (uint64_t)(buf + got);
        q.desc[0].len = 64 - got;
        q.desc[0].flags = DESC_WRITE;
        q.desc[0].next = 0;
        vq_push(&q, 0);
        vq_notify(&q);
        uint32_t id, len;
        if (!vq_wait(&q, &id, &len)) {
            kprintf("VIREO-TEST rng%d: FAIL timeout after %u bytes\n", n, got);
            return;
        }
        got += len > 64 - got ? 64 - got : len;
    }
    int nonzero = 0;
    for (int i = 0; i < 64; i++)
        nonzero |= buf[i];
    kprintf("VIREO-TEST rng%d: read=%u nonzero=%s\n", n, got, nonzero ? "yes" : "no");
}

/* ------------------------------------------------------------------ */
/* net */

#define NET_HDR_LEN 12      /* struct virtio_net_hdr with num_buffers */
#define NET_BUF_LEN 2048    /* header + largest untagged/tagged frame */
#define NET_RX_MAX  64      /* receive buffers per device */
#define MAX_NET     8

struct net_state {
    int slot, n, echo;
    struct vq rx, tx;
    uint16_t nbufs;          /* rx buffers; tx descriptor i reuses rx buffer i */
    uint8_t *bufs;           /* nbufs * NET_BUF_LEN */
    uint8_t *txbuf;          /* the greeting frame, tx descriptor nbufs */
    uint8_t mac[6];
    uint32_t rx_count;
};

static struct net_state nets[MAX_NET];
static int n_nets;

static void net_post_rx(struct net_state *s, uint16_t i)
{
    s->rx.desc[i].addr = (uint64_t)(s->bufs + (uint64_t)i * NET_BUF_LEN);
    s->rx.desc[i].len = NET_BUF_LEN;
    s->rx.desc[i].flags = DESC_WRITE;
    s->rx.desc[i].next = 0;
    vq_push(&s->rx, i);
}

static void net_run(int slot, int n, int echo)
{
    uint64_t b = slot_base(slot);
    uint64_t feat = 0;
    if (n_nets >= MAX_NET) {
        kprintf("VIREO-TEST net%d: FAIL too many net devices\n", n);
        return;
    }
    struct net_state *s = &nets[n_nets];
    memset(s, 0, sizeof(*s));
    s->slot = slot;
    s->n = n;
    s->echo = echo;
    const char *err = dev_begin(b, NET_F_MAC, &feat);
    if (!err)
        err = vq_setup(b, 0, NET_RX_MAX, &s->rx);
    if (!err)
        err = vq_setup(b, 1, 2 * NET_RX_MAX, &s->tx);
    if (!err && s->tx.size < 2)
        err = "transmit queue too small";
    if (!err) {
        s->nbufs = s->rx.size;
        if (s->nbufs > s->tx.size - 1)
            s->nbufs = s->tx.size - 1;
        s->bufs = heap_alloc((size_t)s->nbufs * NET_BUF_LEN, 4096, 0);
        s->txbuf = heap_alloc(NET_BUF_LEN, 64, 0);
        if (!s->bufs || !s->txbuf)
            err = "out of memory";
    }
    if (err) {
        dev_fail(b);
        kprintf("VIREO-TEST net%d: FAIL %s\n", n, err);
        return;
    }
    if (feat & NET_F_MAC) {
        for (int i = 0; i < 6; i++)
            s->mac[i] = mmio_read8(b + VM_CONFIG + i);
    } else {
        /* no MAC offered: a locally administered one of our own */
        uint8_t m[6] = { 0x02, 0x56, 0x49, 0x52, 0x45, (uint8_t)n };
        memcpy(s->mac, m, 6);
    }

    /* Receive buffers first, so a quick answer is not dropped. */
    for (uint16_t i = 0; i < s->nbufs; i++)
        net_post_rx(s, i);
    dev_ready(b);
    vq_notify(&s->rx);

    /* One broadcast frame: EtherType 0x88B5 (IEEE local experimental). */
    uint8_t *f = s->txbuf;
    memset(f, 0, NET_BUF_LEN);
    uint8_t *eth = f + NET_HDR_LEN;
    memset(eth, 0xff, 6);           /* destination: broadcast */
    memcpy(eth + 6, s->mac, 6);     /* source: our MAC */
    eth[12] = 0x88;
    eth[13] = 0xB5;
    static const char payload[] = "VIREO-TEST-FRAME";
    memcpy(eth + 14, payload, sizeof(payload) - 1);
    uint32_t flen = 64;             /* minimum Ethernet frame without FCS is 60 */
    uint16_t d = s->nbufs;
    s->tx.desc[d].addr = (uint64_t)f;
    s->tx.desc[d].len = NET_HDR_LEN + flen;
    s->tx.desc[d].flags = 0;
    s->tx.desc[d].next = 0;
    vq_push(&s->tx, d);
    vq_notify(&s->tx);
    uint32_t id, len;
    n_nets++;
    if (!vq_wait(&s->tx, &id, &len)) {
        kprintf("VIREO-TEST net%d: mac=%02x:%02x:%02x:%02x:%02x:%02x FAIL timeout tx\n", n,
                s->mac[0], s->mac[1], s->mac[2], s->mac[3], s->mac[4], s->mac[5]);
        return;
    }
    kprintf("VIREO-TEST net%d: mac=%02x:%02x:%02x:%02x:%02x:%02x tx=ok\n", n,
            s->mac[0], s->mac[1], s->mac[2], s->mac[3], s->mac[4], s->mac[5]);
}

/* Called from the idle loop: handle received frames and finished sends. */
static void net_poll(struct net_state *s)
{
    uint32_t id, len;
    int rx_notify = 0, tx_notify = 0;
    /* Finished transmissions: in echo mode descriptor i carried rx buffer i,
     * which goes back to the receive queue. */
    while (vq_pop(&s->tx, &id, &len)) {
        if (id < s->nbufs) {
            net_post_rx(s, (uint16_t)id);
            rx_notify = 1;
        }
    }
    while (vq_pop(&s->rx, &id, &len)) {
        if (id >= s->nbufs)
            continue; /* not ours; ignore */
        uint8_t *buf = s->bufs + (uint64_t)id * NET_BUF_LEN;
        uint8_t *eth = buf + NET_HDR_LEN;
        uint32_t flen = len > NET_HDR_LEN ? len - NET_HDR_LEN : 0;
        if (s->rx_count < 8) {
            uint32_t et = flen >= 14 ? ((uint32_t)eth[12] << 8) | eth[13] : 0;
            kprintf("VIREO-TEST net%d: rx len=%u ethertype=0x%04x\n", s->n, flen, et);
        }
        s->rx_count++;
        if (s->echo && flen >= 14 && flen <= NET_BUF_LEN - NET_HDR_LEN) {
            uint8_t tmp[6];
            memcpy(tmp, eth, 6);       /* swap destination and source MAC */
            memcpy(eth, eth + 6, 6);
            memcpy(eth + 6, tmp, 6);
            memset(buf, 0, NET_HDR_LEN); /* plain frame: no offloads */
            s->tx.desc[id].addr = (uint64_t)buf;
            s->tx.desc[id].len = NET_HDR_LEN + flen;
            s->tx.desc[id].flags = 0;
            s->tx.desc[id].next = 0;
            vq_push(&s->tx, (uint16_t)id);
            tx_notify = 1;
        } else {
            net_post_rx(s, (uint16_t)id);
            rx_notify = 1;
        }
    }
    if (tx_notify)
        vq_notify(&s->tx);
    if (rx_notify)
        vq_notify(&s->rx);
}

/* Transmit flood (vireo.netbench=FRAMES[,SIZE]) on the first net device:
 * FRAMES broadcast frames of SIZE bytes (Ethernet header and payload, no
 * FCS), EtherType 0x88B5, payload "VIREO-NETBENCH" then the sequence
 * number (32-bit big-endian, from 0). The ring is kept full: whenever the
 * device has returned descriptors they are refilled at once, with one
 * notification per refill (none while the device asks for none), and no
 * frame is waited for on its own.
 *
 * Under an emulating hypervisor (the PVM /dev/kvm of our build machines)
 * every guest instruction costs microseconds, so the loop does as little as
 * it can per frame: descriptor i always carries buffer i and sits in avail
 * slot i (written once), a frame costs one store (its sequence number),
 * and the avail and used indexes are touched once per batch. That relies on
 * the device completing transmissions in order, as vireo-vmm and QEMU do;
 * the last used element of each batch is checked, and a device that does
 * otherwise ends the run with FAIL. */

#define NETBENCH_TAG     "VIREO-NETBENCH"
#define NETBENCH_SEQ_OFF 28     /* after the 14-byte header and the tag */
#define USED_F_NO_NOTIFY 1      /* VRING_USED_F_NO_NOTIFY */

static void net_bench(uint32_t frames, uint32_t size)
{
    if (n_nets == 0) {
        kprintf("VIREO-TEST netbench FAIL no net device\n");
        return;
    }
    struct net_state *s = &nets[0];
    struct vq *q = &s->tx;
    uint16_t n = q->size; /* a power of two */
    uint32_t stride = (NET_HDR_LEN + size + 63) & ~63u;
    uint8_t *bufs = heap_alloc((size_t)n * stride, 4096, 0);
    if (!bufs) {
        kprintf("VIREO-TEST netbench FAIL out of memory\n");
        return;
    }
    /* Every earlier send has completed (net_run waited): no descriptor is
     * in flight, and avail index a uses descriptor a % n. */
    for (uint16_t i = 0; i < n; i++) {
        uint8_t *f = bufs + (uint64_t)i * stride;
        memset(f, 0, NET_HDR_LEN + size);
        uint8_t *eth = f + NET_HDR_LEN;
        memset(eth, 0xff, 6);       /* destination: broadcast */
        memcpy(eth + 6, s->mac, 6);
        eth[12] = 0x88;
        eth[13] = 0xB5;
        memcpy(eth + 14, NETBENCH_TAG, sizeof(NETBENCH_TAG) - 1);
        q->desc[i].addr = (uint64_t)f;
        q->desc[i].len = NET_HDR_LEN + size;
        q->desc[i].flags = 0;
        q->desc[i].next = 0;
        q->avail->ring[i] = i;
    }
    uint8_t *seq0 = bufs + NET_HDR_LEN + NETBENCH_SEQ_OFF;
    uint16_t a = q->avail_idx, u = q->last_used;
    uint32_t sent = 0, done = 0;
    const char *err = 0;
    uint64_t t0 = rdtsc();
    struct deadline d = deadline_ms(5000);
    while (done < frames) {
        uint32_t room = n - (uint16_t)(a - u);
        uint32_t k = frames - sent;
        if (k > room)
            k = room;
        if (k) {
            uint32_t slot = a & (n - 1);
            uint8_t *p = seq0 + (uint64_t)slot * stride;
            for (uint32_t j = 0; j < k; j++) {
                *(volatile uint32_t *)p = __builtin_bswap32(sent); /* big-endian */
                sent++;
                if (++slot == n) {
                    slot = 0;
                    p = seq0;
                } else {
                    p += stride;
                }
            }
            a = (uint16_t)(a + k);
            barrier();
            q->avail->idx = a;
            mfence(); /* the avail index before the device's flag */
            if (!(q->used->flags & USED_F_NO_NOTIFY))
                mmio_write32(q->base + VM_QUEUE_NOTIFY, q->index);
        }
        uint16_t nu = q->used->idx;
        if (nu != u) {
            barrier();
            uint16_t last = (uint16_t)(nu - 1);
            if (q->used->ring[last & (n - 1)].id != (uint32_t)(last & (n - 1))) {
                err = "out-of-order completion";
                break;
            }
            done += (uint16_t)(nu - u);
            u = nu;
            d = deadline_ms(5000);
        } else if (deadline_passed(&d)) {
            err = "timeout";
            break;
        } else {
            cpu_relax();
        }
    }
    uint64_t cycles = rdtsc() - t0;
    q->avail_idx = a;
    q->last_used = u;
    if (err)
        kprintf("VIREO-TEST netbench sent=%u cycles=%lu FAIL %s (%u completed)\n", sent, cycles,
                err, done);
    else
        kprintf("VIREO-TEST netbench sent=%u cycles=%lu\n", sent, cycles);
}

/* Sequential throughput (vireo.blkbench=MIB[,KIB[,DEPTH]]) on the first
 * writable block device: MIB MiB written from sector 0 in requests of KIB
 * KiB with DEPTH requests in flight, a flush, then the same range read
 * back. Each request's data begins with its first sector number (the rest
 * of the buffer is left as it is), so the read pass checks that every
 * request came back from where it was written. Times are TSC cycles from
 * the first submission to the last completion of each pass; the host turns
 * them into seconds (it knows the TSC's rate, the guest does not).
 *
 * Request slot i owns descriptors 3i (header), 3i+1 (data), 3i+2 (status).
 * The device is reset and set up again with a queue large enough for
 * DEPTH chains, and asked for no interrupts: this loop polls. */

#define BLKBENCH_KIB_MAX   1024  /* vireo-vmm's size_max: one segment */
#define BLKBENCH_DEPTH_MAX 64
#define AVAIL_F_NO_INTERRUPT 1   /* VRING_AVAIL_F_NO_INTERRUPT */

struct blkbench {
    struct vq q;
    struct blk_req_hdr *hdr;   /* depth headers */
    volatile uint8_t *status;  /* depth status bytes */
    uint8_t *data;             /* depth buffers of req bytes */
    uint32_t req, depth;
};

static void blkbench_submit(struct blkbench *b, uint16_t i, uint32_t type, uint64_t sector)
{
    struct vq *q = &b->q;
    uint8_t *buf = b->data + (uint64_t)i * b->req;
    b->hdr[i].type = type;
    b->hdr[i].reserved = 0;
    b->hdr[i].sector = sector;
    b->status[i] = 0xff;
    if (type == BLK_T_OUT)
        *(uint64_t *)buf = sector;
    uint16_t d = (uint16_t)(3 * i);
    q->desc[d].addr = (uint64_t)&b->hdr[i];
    q->desc[d].len = sizeof(struct blk_req_hdr);
    q->desc[d].flags = DESC_NEXT;
    q->desc[d].next = d + 1;
    q->desc[d + 1].addr = (uint64_t)buf;
    q->desc[d + 1].len = b->req;
    q->desc[d + 1].flags = DESC_NEXT | (type == BLK_T_IN ? DESC_WRITE : 0);
    q->desc[d + 1].next = d + 2;
    q->desc[d + 2].addr = (uint64_t)&b->status[i];
    q->desc[d + 2].len = 1;
    q->desc[d + 2].flags = DESC_WRITE;
    q->desc[d + 2].next = 0;
    vq_push(q, d);
}

/* One pass over `total` bytes; 0 and the cycles it took, or a reason. */
static const char *blkbench_pass(struct blkbench *b, uint32_t type, uint64_t total,
                                 uint64_t *cycles)
{
    struct vq *q = &b->q;
    uint64_t per = b->req / 512, sectors = total / 512;
    uint64_t next = 0;      /* next sector to submit */
    uint64_t done = 0;      /* sectors completed */
    uint32_t inflight = 0;
    uint64_t t0 = rdtsc();
    struct deadline dl = deadline_ms(10000);
    /* Fill the ring, then refill each slot as its request completes. */
    for (uint16_t i = 0; i < b->depth && next < sectors; i++, next += per, inflight++)
        blkbench_submit(b, i, type, next);
    vq_notify(q);
    while (inflight) {
        uint32_t id, len;
        int any = 0;
        while (vq_pop(q, &id, &len)) {
            any = 1;
            if (id % 3 != 0 || id / 3 >= b->depth)
                return "completion of a descriptor that was no request's head";
            uint16_t i = (uint16_t)(id / 3);
            if (b->status[i] != BLK_S_OK)
                return type == BLK_T_IN ? "read status not OK" : "write status not OK";
            if (type == BLK_T_IN &&
                *(uint64_t *)(b->data + (uint64_t)i * b->req) != b->hdr[i].sector)
                return "read back data of another sector";
            done += per;
            inflight--;
            if (next < sectors) {
                blkbench_submit(b, i, type, next);
                next += per;
                inflight++;
            }
        }
        if (any) {
            if (inflight) {
                mfence(); /* the avail index before the device's flag */
                if (!(q->used->flags & USED_F_NO_NOTIFY))
                    mmio_write32(q->base + VM_QUEUE_NOTIFY, q->index);
            }
            dl = deadline_ms(10000);
        } else if (deadline_passed(&dl)) {
            return "timeout";
        } else {
            cpu_relax();
        }
    }
    *cycles = rdtsc() - t0;
    return done == sectors ? 0 : "short pass";
}

void virtio_blk_bench(uint32_t mib, uint32_t kib, uint32_t depth)
{
    if (blkbench_slot < 0) {
        kprintf("VIREO-TEST blkbench FAIL no writable block device\n");
        return;
    }
    if (kib == 0 || kib > BLKBENCH_KIB_MAX || (kib & (kib - 1)) || mib == 0 ||
        (uint64_t)mib * 1024 % kib) {
        kprintf("VIREO-TEST blkbench FAIL bad size %u MiB in %u KiB requests\n", mib, kib);
        return;
    }
    if (depth == 0 || depth > BLKBENCH_DEPTH_MAX)
        depth = depth ? BLKBENCH_DEPTH_MAX : 1;
    uint64_t base = slot_base(blkbench_slot);
    uint64_t feat = 0;
    struct blkbench b;
    b.req = kib * 1024;
    const char *err = dev_begin(base, BLK_F_FLUSH, &feat);
    if (!err)
        err = vq_setup(base, 0, 256, &b.q);
    if (!err && b.q.size < 3 * depth) {
        depth = b.q.size / 3;
        if (depth == 0)
            err = "queue too small";
    }
    b.depth = depth;
    if (!err) {
        b.hdr = heap_alloc(sizeof(struct blk_req_hdr) * depth, 64, 1);
        b.status = heap_alloc(depth, 64, 1);
        b.data = heap_alloc((size_t)depth * b.req, 4096, 1);
        if (!b.hdr || !b.status || !b.data)
            err = "out of memory";
    }
    if (err) {
        dev_fail(base);
        kprintf("VIREO-TEST blkbench FAIL %s\n", err);
        return;
    }
    b.q.avail->flags = AVAIL_F_NO_INTERRUPT;
    dev_ready(base);
    uint64_t cap = config_read32(base, 0) | ((uint64_t)config_read32(base, 4) << 32);
    uint64_t total = (uint64_t)mib << 20;
    if (cap * 512 < total) {
        kprintf("VIREO-TEST blkbench FAIL disk of %lu sectors is smaller than %u MiB\n", cap, mib);
        return;
    }
    uint64_t wc = 0, fc = 0, rc = 0;
    err = blkbench_pass(&b, BLK_T_OUT, total, &wc);
    if (!err && (feat & BLK_F_FLUSH)) {
        uint64_t t0 = rdtsc();
        /* slot 0's header and status serve the flush: nothing is in flight */
        b.hdr[0].type = BLK_T_FLUSH;
        b.hdr[0].reserved = 0;
        b.hdr[0].sector = 0;
        b.status[0] = 0xff;
        b.q.desc[0].addr = (uint64_t)&b.hdr[0];
        b.q.desc[0].len = sizeof(struct blk_req_hdr);
        b.q.desc[0].flags = DESC_NEXT;
        b.q.desc[0].next = 2;
        b.q.desc[2].addr = (uint64_t)&b.status[0];
        b.q.desc[2].len = 1;
        b.q.desc[2].flags = DESC_WRITE;
        b.q.desc[2].next = 0;
        vq_push(&b.q, 0);
        vq_notify(&b.q);
        uint32_t id, len;
        if (!vq_wait(&b.q, &id, &len))
            err = "timeout flush";
        else if (b.status[0] != BLK_S_OK)
            err = "flush status not OK";
        fc = rdtsc() - t0;
    }
    if (!err)
        err = blkbench_pass(&b, BLK_T_IN, total, &rc);
    if (err)
        kprintf("VIREO-TEST blkbench bytes=%lu req=%u depth=%u FAIL %s\n", total, b.req, depth,
                err);
    else
        kprintf("VIREO-TEST blkbench bytes=%lu req=%u depth=%u write_cycles=%lu "
                "flush_cycles=%lu read_cycles=%lu verify=ok\n",
                total, b.req, depth, wc, fc, rc);
}

/* ------------------------------------------------------------------ */
/* balloon: gives the device pages it never touches. The pool is every page
 * from the end of the allocator (sealed once the scan is over) to the end
 * of the RAM region the image is in; ballooned pages are the pool's first
 * `actual` pages, so inflating takes the next ones up and deflating gives
 * back from the top. */

#define BALLOON_BATCH   1024  /* PFNs per request: one page of them */
#define MAX_BALLOON     4

struct balloon_state {
    int slot, n, ok;
    struct vq inf, def;
    uint32_t *pfns;          /* BALLOON_BATCH entries */
    uint64_t pool_pfn;       /* first page of the pool */
    uint32_t pool_pages;
    uint32_t actual;         /* pages the device holds */
    uint32_t target;         /* last num_pages seen */
};

static struct balloon_state balloons[MAX_BALLOON];
static int n_balloons;

static void balloon_run(int slot, int n)
{
    uint64_t b = slot_base(slot);
    uint64_t feat = 0;
    if (n_balloons >= MAX_BALLOON) {
        kprintf("VIREO-TEST balloon%d: FAIL too many balloons\n", n);
        return;
    }
    struct balloon_state *s = &balloons[n_balloons];
    memset(s, 0, sizeof(*s));
    s->slot = slot;
    s->n = n;
    const char *err = dev_begin(b, 0, &feat);
    if (!err)
        err = vq_setup(b, 0, 4, &s->inf);
    if (!err)
        err = vq_setup(b, 1, 4, &s->def);
    if (!err) {
        s->pfns = heap_alloc(4 * BALLOON_BATCH, 4096, 1);
        if (!s->pfns)
            err = "out of memory";
    }
    if (err) {
        dev_fail(b);
        kprintf("VIREO-TEST balloon%d: FAIL %s\n", n, err);
        return;
    }
    dev_ready(b);
    mmio_write32(b + VM_CONFIG + 4, 0); /* actual: nothing yet */
    n_balloons++;
}

/* num_pages, read under the config generation counter. */
static uint32_t balloon_read_target(uint64_t b)
{
    uint32_t gen, v;
    int tries = 0;
    do {
        gen = mmio_read32(b + VM_CONFIG_GEN);
        v = config_read32(b, 0);
    } while (gen != mmio_read32(b + VM_CONFIG_GEN) && ++tries < 10);
    return v;
}

/* Sends `count` PFNs from pool page `first` up on queue `q`; 0 on timeout. */
static int balloon_send(struct balloon_state *s, struct vq *q, uint32_t first, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++)
        s->pfns[i] = (uint32_t)(s->pool_pfn + first + i);
    q->desc[0].addr = (uint64_t)s->pfns;
    q->desc[0].len = 4 * count;
    q->desc[0].flags = 0;
    q->desc[0].next = 0;
    vq_push(q, 0);
    vq_notify(q);
    uint32_t id, len;
    return vq_wait(q, &id, &len);
}

/* Moves toward num_pages (as far as the pool allows) and reports. */
static void balloon_adjust(struct balloon_state *s)
{
    uint64_t b = slot_base(s->slot);
    uint32_t target = balloon_read_target(b);
    if (target == s->target && s->ok)
        return;
    s->target = target;
    uint32_t want = target < s->pool_pages ? target : s->pool_pages;
    const char *err = 0;
    while (s->actual < want) {
        uint32_t k = want - s->actual;
        if (k > BALLOON_BATCH)
            k = BALLOON_BATCH;
        if (!balloon_send(s, &s->inf, s->actual, k)) {
            err = "timeout inflate";
            break;
        }
        s->actual += k;
    }
    while (!err && s->actual > want) {
        uint32_t k = s->actual - want;
        if (k > BALLOON_BATCH)
            k = BALLOON_BATCH;
        if (!balloon_send(s, &s->def, s->actual - k, k)) {
            err = "timeout deflate";
            break;
        }
        s->actual -= k;
    }
    mmio_write32(b + VM_CONFIG + 4, s->actual);
    s->ok = 1;
    if (err)
        kprintf("VIREO-TEST balloon%d: target=%u actual=%u FAIL %s\n", s->n, target, s->actual,
                err);
    else
        kprintf("VIREO-TEST balloon%d: target=%u actual=%u\n", s->n, target, s->actual);
}

/* After the scan: the pool is what the allocator did not use. */
static void balloon_start(void)
{
    if (!n_balloons)
        return;
    uint64_t end;
    uint64_t start = heap_seal(&end);
    uint64_t pages = (end - start) / 4096;
    /* Each balloon gets its own share of the pool. */
    pages /= (uint64_t)n_balloons;
    if (pages > 0xffffffffULL)
        pages = 0xffffffffULL;
    for (int i = 0; i < n_balloons; i++) {
        balloons[i].pool_pfn = start / 4096 + (uint64_t)i * pages;
        balloons[i].pool_pages = (uint32_t)pages;
        balloon_adjust(&balloons[i]);
    }
}

/* ------------------------------------------------------------------ */
/* vsock (virtio 1.2, 5.10): one stream connection at a time, driven from
 * the idle loop. vireo.vsock=listen:PORT accepts a connection from the host
 * on PORT; vireo.vsock=connect:PORT connects to host (CID 2) port PORT and
 * sends a greeting. Either way, every byte received is echoed back; a
 * SHUTDOWN of both directions is answered with RST. */

#define ID_VSOCK         19
#define VSOCK_HDR_LEN    44
#define VSOCK_BUF_LEN    4096
#define VSOCK_RX_MAX     16
#define VSOCK_HOST_CID   2
#define VSOCK_BUF_ALLOC  65536
#define VSOCK_LOCAL_PORT 50000 /* our port for connect mode */
#define VS_REQUEST        1
#define VS_RESPONSE       2
#define VS_RST            3
#define VS_SHUTDOWN       4
#define VS_RW             5
#define VS_CREDIT_UPDATE  6
#define VS_CREDIT_REQUEST 7

struct vsock_hdr {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct vsock_hdr) == VSOCK_HDR_LEN, "vsock header is 44 bytes");

struct vsock_state {
    int ok, n;
    struct vq rx, tx, ev;
    uint8_t *rxbufs; /* rx.size * VSOCK_BUF_LEN */
    uint8_t *txbuf;  /* one packet at a time, completed before the next */
    uint8_t *evbuf;
    uint64_t cid;
    int conn;        /* 0 none, 1 connecting, 2 established */
    uint32_t local_port, peer_port;
    uint32_t fwd_cnt, tx_cnt, peer_buf_alloc, peer_fwd_cnt;
    uint32_t rx_packets;
};

static struct vsock_state vsock;
static int vsock_mode; /* 0: only bring the device up, 1: listen, 2: connect */
static uint32_t vsock_port;

void virtio_vsock_option(int mode, uint32_t port)
{
    vsock_mode = mode;
    vsock_port = port;
}

static void vsock_post_rx(struct vsock_state *s, uint16_t i)
{
    s->rx.desc[i].addr = (uint64_t)(s->rxbufs + (uint64_t)i * VSOCK_BUF_LEN);
    s->rx.desc[i].len = VSOCK_BUF_LEN;
    s->rx.desc[i].flags = DESC_WRITE;
    s->rx.desc[i].next = 0;
    vq_push(&s->rx, i);
}

/* Sends one packet from `local` to host port `peer`; waits until the
 * device took it. */
static int vsock_send_to(struct vsock_state *s, uint32_t local, uint32_t peer, uint16_t op,
                         uint32_t flags, const uint8_t *data, uint32_t len)
{
    if (len > VSOCK_BUF_LEN - VSOCK_HDR_LEN)
        return 0;
    struct vsock_hdr *h = (struct vsock_hdr *)s->txbuf;
    memset(h, 0, sizeof(*h));
    h->src_cid = s->cid;
    h->dst_cid = VSOCK_HOST_CID;
    h->src_port = local;
    h->dst_port = peer;
    h->len = len;
    h->type = 1; /* stream */
    h->op = op;
    h->flags = flags;
    h->buf_alloc = VSOCK_BUF_ALLOC;
    h->fwd_cnt = s->fwd_cnt;
    if (len)
        memcpy(s->txbuf + VSOCK_HDR_LEN, data, len);
    s->tx.desc[0].addr = (uint64_t)s->txbuf;
    s->tx.desc[0].len = VSOCK_HDR_LEN + len;
    s->tx.desc[0].flags = 0;
    s->tx.desc[0].next = 0;
    vq_push(&s->tx, 0);
    vq_notify(&s->tx);
    uint32_t id, l;
    return vq_wait(&s->tx, &id, &l);
}

static int vsock_send(struct vsock_state *s, uint16_t op, uint32_t flags, const uint8_t *data,
                      uint32_t len)
{
    return vsock_send_to(s, s->local_port, s->peer_port, op, flags, data, len);
}

static void vsock_run(int slot, int n)
{
    uint64_t b = slot_base(slot);
    uint64_t feat = 0;
    struct vsock_state *s = &vsock;
    if (s->ok) {
        kprintf("VIREO-TEST vsock%d: ignored (one vsock device is driven)\n", n);
        return;
    }
    memset(s, 0, sizeof(*s));
    s->n = n;
    const char *err = dev_begin(b, 0, &feat);
    if (!err)
        err = vq_setup(b, 0, VSOCK_RX_MAX, &s->rx);
    if (!err)
        err = vq_setup(b, 1, 4, &s->tx);
    if (!err)
        err = vq_setup(b, 2, 4, &s->ev);
    if (!err) {
        s->rxbufs = heap_alloc((size_t)s->rx.size * VSOCK_BUF_LEN, 4096, 0);
        s->txbuf = heap_alloc(VSOCK_BUF_LEN, 64, 0);
        s->evbuf = heap_alloc(64, 64, 1);
        if (!s->rxbufs || !s->txbuf || !s->evbuf)
            err = "out of memory";
    }
    if (err) {
        dev_fail(b);
        kprintf("VIREO-TEST vsock%d: FAIL %s\n", n, err);
        return;
    }
    s->cid = (uint64_t)config_read32(b, 0) | ((uint64_t)config_read32(b, 4) << 32);
    for (uint16_t i = 0; i < s->rx.size; i++)
        vsock_post_rx(s, i);
    s->ev.desc[0].addr = (uint64_t)s->evbuf;
    s->ev.desc[0].len = 64;
    s->ev.desc[0].flags = DESC_WRITE;
    s->ev.desc[0].next = 0;
    vq_push(&s->ev, 0);
    dev_ready(b);
    vq_notify(&s->rx);
    vq_notify(&s->ev);
    s->ok = 1;
    kprintf("VIREO-TEST vsock%d: cid=%lu\n", n, (unsigned long)s->cid);
    if (vsock_mode == 1) {
        kprintf("VIREO-TEST vsock: listening on port %u\n", vsock_port);
    } else if (vsock_mode == 2) {
        s->local_port = VSOCK_LOCAL_PORT;
        s->peer_port = vsock_port;
        s->conn = 1;
        kprintf("VIREO-TEST vsock: connecting to port %u\n", vsock_port);
        if (!vsock_send(s, VS_REQUEST, 0, 0, 0))
            kprintf("VIREO-TEST vsock: FAIL request not taken\n");
    }
}

static void vsock_packet(struct vsock_state *s, const struct vsock_hdr *h, const uint8_t *data)
{
    if (h->dst_cid != s->cid || h->src_cid != VSOCK_HOST_CID)
        return;
    if (h->op == VS_REQUEST) {
        if (vsock_mode == 1 && s->conn == 0 && h->dst_port == vsock_port) {
            s->local_port = h->dst_port;
            s->peer_port = h->src_port;
            s->conn = 2;
            s->fwd_cnt = s->tx_cnt = 0;
            s->peer_buf_alloc = h->buf_alloc;
            s->peer_fwd_cnt = h->fwd_cnt;
            vsock_send(s, VS_RESPONSE, 0, 0, 0);
            kprintf("VIREO-TEST vsock: accepted port=%u from host port=%u\n", s->local_port,
                    s->peer_port);
        } else {
            vsock_send_to(s, h->dst_port, h->src_port, VS_RST, 0, 0, 0);
        }
        return;
    }
    if (s->conn == 0 || h->dst_port != s->local_port || h->src_port != s->peer_port) {
        if (h->op != VS_RST)
            vsock_send_to(s, h->dst_port, h->src_port, VS_RST, 0, 0, 0);
        return;
    }
    s->peer_buf_alloc = h->buf_alloc;
    s->peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case VS_RESPONSE:
        if (s->conn == 1) {
            static const char hello[] = "VIREO-TEST hello from the guest\n";
            s->conn = 2;
            kprintf("VIREO-TEST vsock: connected to host port=%u\n", s->peer_port);
            vsock_send(s, VS_RW, 0, (const uint8_t *)hello, sizeof(hello) - 1);
            s->tx_cnt += sizeof(hello) - 1;
        }
        break;
    case VS_RW: {
        uint32_t len = h->len;
        if (len > VSOCK_BUF_LEN - VSOCK_HDR_LEN)
            len = VSOCK_BUF_LEN - VSOCK_HDR_LEN;
        if (s->rx_packets++ < 8)
            kprintf("VIREO-TEST vsock: rx len=%u\n", len);
        s->fwd_cnt += len;
        uint32_t credit = s->peer_buf_alloc - (s->tx_cnt - s->peer_fwd_cnt);
        if (credit < len) {
            kprintf("VIREO-TEST vsock: FAIL no credit to echo %u bytes\n", len);
            break;
        }
        vsock_send(s, VS_RW, 0, data, len);
        s->tx_cnt += len;
        break;
    }
    case VS_SHUTDOWN:
        kprintf("VIREO-TEST vsock: shutdown flags=%u\n", h->flags);
        if ((h->flags & 3) == 3) {
            vsock_send(s, VS_RST, 0, 0, 0);
            s->conn = 0;
        }
        break;
    case VS_RST:
        kprintf("VIREO-TEST vsock: %s\n", s->conn == 1 ? "refused" : "reset");
        s->conn = 0;
        break;
    case VS_CREDIT_REQUEST:
        vsock_send(s, VS_CREDIT_UPDATE, 0, 0, 0);
        break;
    default:
        break;
    }
}

static void vsock_poll(struct vsock_state *s)
{
    uint32_t id, len;
    int posted = 0;
    while (vq_pop(&s->rx, &id, &len)) {
        if (id >= s->rx.size)
            continue;
        const uint8_t *buf = s->rxbufs + (uint64_t)id * VSOCK_BUF_LEN;
        if (len >= VSOCK_HDR_LEN)
            vsock_packet(s, (const struct vsock_hdr *)buf, buf + VSOCK_HDR_LEN);
        vsock_post_rx(s, (uint16_t)id);
        posted = 1;
    }
    if (posted)
        vq_notify(&s->rx);
}

/* ------------------------------------------------------------------ */

static uint8_t present[VIRTIO_SLOTS];

int virtio_slot_present(int slot)
{
    return slot >= 0 && slot < VIRTIO_SLOTS && present[slot];
}

/* Acknowledge a slot's interrupt (called from the interrupt handler). */
void virtio_ack_slot(int slot)
{
    if (!virtio_slot_present(slot))
        return;
    uint64_t b = slot_base(slot);
    uint32_t st = mmio_read32(b + VM_INT_STATUS);
    if (st)
        mmio_write32(b + VM_INT_ACK, st);
}

void virtio_poll_all(void)
{
    for (int i = 0; i < n_nets; i++)
        net_poll(&nets[i]);
    for (int i = 0; i < n_balloons; i++)
        if (balloons[i].ok)
            balloon_adjust(&balloons[i]);
    if (vsock.ok)
        vsock_poll(&vsock);
}

/* Scan every slot, drive each device; returns the number of devices found. */
int virtio_scan(int echo, uint32_t bench_frames, uint32_t bench_size)
{
    int count = 0, nblk = 0, nnet = 0, nrng = 0, nballoon = 0, nvsock = 0;
    for (int slot = 0; slot < VIRTIO_SLOTS; slot++) {
        uint64_t b = slot_base(slot);
        if (mmio_read32(b + VM_MAGIC) != VIRTIO_MAGIC)
            continue;
        uint32_t id = mmio_read32(b + VM_DEVICE_ID);
        if (id == 0)
            continue; /* empty slot */
        count++;
        present[slot] = 1;
        uint32_t version = mmio_read32(b + VM_VERSION);
        if (version != 2) {
            kprintf("VIREO-TEST slot%d: device id %u ignored (virtio-mmio version %u)\n", slot, id,
                    version);
            continue;
        }
        switch (id) {
        case ID_BLK:
            blk_run(slot, nblk++);
            break;
        case ID_NET:
            net_run(slot, nnet++, echo);
            break;
        case ID_RNG:
            rng_run(slot, nrng++);
            break;
        case ID_BALLOON:
            balloon_run(slot, nballoon++);
            break;
        case ID_VSOCK:
            vsock_run(slot, nvsock++);
            break;
        default:
            kprintf("VIREO-TEST slot%d: device id %u ignored\n", slot, id);
            break;
        }
        /* Drop any interrupt raised while we polled. */
        virtio_ack_slot(slot);
    }
    if (bench_frames)
        net_bench(bench_frames, bench_size);
    balloon_start();
    return count;
}
