//! Feeds arbitrary bytes to `Preface::decode`; whatever decodes must re-encode to the same 10
//! bytes, and negotiating with it must not panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_proto::Preface;
use warren_proto::preface::{PREFACE_LEN, mismatch_message};

fuzz_target!(|data: &[u8]| {
    if let Ok(preface) = Preface::decode(data) {
        assert!(preface.min <= preface.max);
        let mut buf = Vec::new();
        preface.encode(&mut buf);
        assert_eq!(&buf[..], &data[..PREFACE_LEN]);
        assert_eq!(Preface::decode(&buf), Ok(preface));
        match preface.negotiate() {
            Some(v) => assert!(preface.min <= v && v <= preface.max),
            None => assert!(!mismatch_message(preface).is_empty()),
        }
    }
});
