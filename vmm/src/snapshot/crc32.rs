//! CRC-32 (IEEE 802.3, as zlib's `crc32`) of a snapshot's body, by
//! `crc32fast` (table-driven, with the CPU's carry-less multiply where it
//! has one: a 1 GiB guest's memory is checked at memory speed).

/// A running CRC-32.
#[derive(Default, Clone)]
pub struct Crc32(crc32fast::Hasher);

impl Crc32 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(&self) -> u32 {
        self.0.clone().finalize()
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
