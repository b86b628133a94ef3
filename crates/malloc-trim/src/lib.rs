//! One call the natter crate cannot make itself (it forbids `unsafe`):
//! glibc keeps freed memory in its malloc arenas, so a server that freed a
//! flood's worth of buffers stays at its peak RSS until it asks for the
//! free pages to go back. Elsewhere this is a no-op (other allocators and
//! libcs return memory on their own terms).

/// Return free memory at the top of the heap and unused whole pages inside
/// every arena to the system. Costs about a millisecond on a busy heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() {
    // SAFETY: malloc_trim takes a plain integer, touches only glibc's own
    // allocator state under its locks, and may be called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

#[cfg(test)]
mod tests {
    #[test]
    fn trim_after_a_large_free_is_safe_to_call() {
        let big: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(big);
        super::trim();
        super::trim();
    }
}
