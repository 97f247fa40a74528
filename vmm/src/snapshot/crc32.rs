//! CRC-32 (IEEE 802.3, as zlib's `crc32`), one table.

/// A running CRC-32.
pub struct Crc32 {
    table: [u32; 256],
    value: u32,
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32 {
    pub fn new() -> Self {
        let mut table = [0u32; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        Self {
            table,
            value: 0xFFFF_FFFF,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        let mut c = self.value;
        for &b in bytes {
            c = self.table[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
        self.value = c;
    }

    pub fn finish(&self) -> u32 {
        !self.value
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zlib_check_value() {
        let mut c = super::Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
    }
}
