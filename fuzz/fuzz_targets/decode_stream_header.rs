//! Feeds arbitrary bytes to `StreamHeader::decode`; whatever decodes must round-trip.

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_proto::StreamHeader;
use warren_proto::frame::HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, used)) = StreamHeader::decode(data) {
        assert!(
            (HEADER_LEN..=data.len()).contains(&used),
            "used {used} of {}",
            data.len()
        );
        let mut buf = Vec::new();
        header.encode(&mut buf);
        assert_eq!(StreamHeader::decode(&buf), Ok((header, buf.len())));
    }
});
