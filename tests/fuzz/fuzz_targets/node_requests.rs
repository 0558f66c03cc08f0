#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = celld_fuzz::node_requests(data);
});
