//! Feeds arbitrary bytes to `Message::decode`, consuming frame after frame. Every message that
//! decodes (except `Unknown`, whose payload is dropped by design) must re-encode to a frame that
//! decodes to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_proto::Message;
use warren_proto::frame::HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((msg, used)) = Message::decode(rest) {
        assert!(
            (HEADER_LEN..=rest.len()).contains(&used),
            "used {used} of {}",
            rest.len()
        );
        if !matches!(msg, Message::Unknown { .. }) {
            let mut buf = Vec::new();
            msg.encode(&mut buf);
            let (again, n) = Message::decode(&buf).expect("a re-encoded message decodes");
            assert_eq!(n, buf.len());
            assert_eq!(again, msg);
        }
        rest = &rest[used..];
    }
});
