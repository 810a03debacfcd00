//! Feeds arbitrary bytes to `proxy::parse`; whatever parses as a header with addresses must
//! re-encode and parse back to the same addresses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_proto::proxy::{self, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Header { version, source, destination, len }) = proxy::parse(data) {
        assert!(len <= data.len(), "used {len} of {}", data.len());
        assert_eq!(source.is_some(), destination.is_some());
        if let (Some(src), Some(dst)) = (source, destination) {
            let mut buf = Vec::new();
            proxy::encode(version, src, dst, &mut buf);
            assert_eq!(
                proxy::parse(&buf),
                Ok(Parsed::Header { version, source, destination, len: buf.len() })
            );
        }
    }
});
