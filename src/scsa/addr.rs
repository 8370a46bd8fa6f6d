//! Unit addresses of SCSI children under an iport with a target map:
//! `"<target>,<lun>"`, both lowercase hexadecimal without leading zeros
//! (the framework formats LUN children as `"%s,%" PRIx64`; devfsadm reads
//! them back with `"%X,%X"` to build `cXtYdZ`).

/// Parses `"t,l"` (or just `"t"`, LUN 0) in hexadecimal.
pub fn parse_unit_address(ua: &[u8]) -> Option<(u32, u64)> {
    let (t, l) = match ua.iter().position(|&c| c == b',') {
        Some(i) => (&ua[..i], Some(&ua[i + 1..])),
        None => (ua, None),
    };
    let target = parse_hex(t)?;
    let lun = match l {
        Some(l) => parse_hex(l)?,
        None => 0,
    };
    Some((u32::try_from(target).ok()?, lun))
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        let d = (c as char).to_digit(16)?;
        Some((acc << 4) | u64::from(d))
    })
}

/// A NUL-terminated target address ("%x") for the target map.
pub struct TargetAddr {
    buf: [u8; 9],
}

impl TargetAddr {
    /// Formats `target` in lowercase hex.
    pub fn new(target: u32) -> Self {
        let mut buf = [0u8; 9];
        let digits = b"0123456789abcdef";
        let mut n = 0;
        let mut started = false;
        for shift in (0..8).rev() {
            let d = ((target >> (4 * shift)) & 0xf) as usize;
            if d != 0 || started || shift == 0 {
                buf[n] = digits[d];
                n += 1;
                started = true;
            }
        }
        Self { buf }
    }

    /// The address without NUL.
    pub fn as_bytes(&self) -> &[u8] {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.buf.len());
        &self.buf[..end]
    }

    /// Pointer to the NUL-terminated address.
    pub fn as_c_ptr(&self) -> *mut core::ffi::c_char {
        self.buf.as_ptr().cast_mut().cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_addresses() {
        assert_eq!(parse_unit_address(b"0,0"), Some((0, 0)));
        assert_eq!(parse_unit_address(b"1f,a"), Some((31, 10)));
        assert_eq!(parse_unit_address(b"3"), Some((3, 0)));
        assert_eq!(parse_unit_address(b"ff,3fff"), Some((255, 0x3fff)));
        assert_eq!(parse_unit_address(b""), None);
        assert_eq!(parse_unit_address(b"1,"), None);
        assert_eq!(parse_unit_address(b"x,1"), None);
        assert_eq!(parse_unit_address(b"1,2,3"), None);
        assert_eq!(parse_unit_address(b"1,11111111111111111"), None);
    }

    #[test]
    fn target_addresses() {
        assert_eq!(TargetAddr::new(0).as_bytes(), b"0");
        assert_eq!(TargetAddr::new(10).as_bytes(), b"a");
        assert_eq!(TargetAddr::new(255).as_bytes(), b"ff");
        assert_eq!(TargetAddr::new(0x1000).as_bytes(), b"1000");
    }
}
