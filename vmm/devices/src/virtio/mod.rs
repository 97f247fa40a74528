//! virtio 1.x devices on the virtio-mmio transport (owned by the virtio work).
