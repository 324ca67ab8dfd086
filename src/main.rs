#![forbid(unsafe_code)]

// Many small, long-lived allocations (the site's records): mimalloc opens a large site
// faster and smaller than the system allocator (see ARCHITECTURE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gatehouse::cli::main()
}
