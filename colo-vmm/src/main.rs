//! colo-vmm: a minimal KVM VMM with COLO roles (see issues 4-6).

fn main() {
    eprintln!("colo-vmm: not implemented yet");
    std::process::exit(2);
}
