//! What a firmware boot says on the serial console when it finds nothing to
//! boot: SeaBIOS prints "No bootable device." (and retries every minute),
//! OVMF reports each failed boot option and falls back to its shell or its
//! setup menu. The VM process keeps running either way, so without this the
//! Domain would look healthy while the guest never starts.
//!
//! Only the end of the console log is read: a failure that later output
//! follows (a CD-ROM after a blank disk, an installer that has since written
//! a boot loader) is not a failure any more.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the log's end is read.
const TAIL: u64 = 16 * 1024;

/// Console text allowed after a verdict before it counts as stale: SeaBIOS's
/// retry notice, OVMF shell's prompt and a few redraws.
const AFTER: usize = 1024;

/// A firmware's words for "nothing to boot", most specific first: the
/// marker, and what the condition says.
const VERDICTS: &[(&str, &str)] = &[
    (
        "No bootable device.",
        "SeaBIOS found no bootable device (the console says \"No bootable device.\")",
    ),
    (
        "Shell>",
        "OVMF found no boot loader and started its UEFI shell (the console shows \"Shell>\")",
    ),
    (
        "Boot Manager Menu",
        "OVMF found no boot loader and shows its boot manager menu",
    ),
];

/// What the console's end says about a firmware boot that found nothing
/// to boot, if it says so.
pub fn boot_problem(console: &str) -> Option<String> {
    let text = strip_escapes(console);
    VERDICTS.iter().find_map(|(marker, what)| {
        let at = text.rfind(marker)?;
        let after = text.len() - at - marker.len();
        // OVMF's shell or menu counts only after a failed boot option: a
        // guest that starts the shell on purpose is not a failure.
        let failed_option = *marker == "No bootable device."
            || text[..at].contains("failed to load Boot")
            || text[..at].contains("Boot Failed");
        (after <= AFTER && failed_option).then(|| (*what).to_string())
    })
}

/// Reads the last part of a console log (nothing if there is none yet).
pub fn console_tail(log: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(log) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(TAIL)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.take(TAIL).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The text without terminal escape sequences (OVMF draws with them).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI: ESC [ parameters, ended by a letter; other escapes: one more char.
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seabios_with_nothing_to_boot() {
        let log = "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\nBooting from Hard Disk...\r\nBoot failed: not a bootable disk\r\n\r\nNo bootable device.  Retrying in 60 seconds.\r\n";
        let p = boot_problem(log).expect("a verdict");
        assert!(p.contains("SeaBIOS found no bootable device"), "{p}");
    }

    #[test]
    fn seabios_that_went_on_to_a_cdrom_is_fine() {
        let mut log = String::from(
            "Booting from Hard Disk...\r\nBoot failed: not a bootable disk\r\nBooting from DVD/CD...\r\n",
        );
        assert_eq!(boot_problem(&log), None);
        // A retry that finally boots: the verdict is followed by a guest.
        log.push_str("No bootable device.  Retrying in 60 seconds.\r\n");
        log.push_str(&"[    0.000000] Linux version 6.1.0\n".repeat(100));
        assert_eq!(boot_problem(&log), None);
    }

    #[test]
    fn ovmf_shell_after_a_failed_option() {
        let log = "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x3,0x0): Not Found\r\n\u{1b}[2J\u{1b}[01;01H\u{1b}[0m\u{1b}[35m\u{1b}[40mUEFI Interactive Shell v2.2\r\nShell> ";
        let p = boot_problem(log).expect("a verdict");
        assert!(p.contains("UEFI shell"), "{p}");
        // The shell on its own (a guest that asked for it) is not a failure.
        assert_eq!(boot_problem("UEFI Interactive Shell v2.2\r\nShell> "), None);
    }

    #[test]
    fn a_guest_that_boots_says_nothing() {
        let log = "BdsDxe: loading Boot0001 \"UEFI Misc Device\"\r\nBdsDxe: starting Boot0001\r\nWelcome to GRUB!\r\n\r\ndebian login: ";
        assert_eq!(boot_problem(log), None);
        assert_eq!(boot_problem(""), None);
    }

    #[test]
    fn escapes_cannot_hide_or_break_anything() {
        assert_eq!(strip_escapes("a\u{1b}[1;2Hb\u{1b}"), "ab");
        assert_eq!(strip_escapes("\u{1b}[\u{1b}[x"), "");
    }

    #[test]
    fn a_missing_log_reads_as_empty() {
        assert_eq!(console_tail(Path::new("/nonexistent/console.log")), "");
    }
}
