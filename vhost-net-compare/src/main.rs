//! vhost-net-compare: the vhost-user net backend that mirrors and compares (see issue 3).

fn main() {
    eprintln!("vhost-net-compare: not implemented yet");
    std::process::exit(2);
}
