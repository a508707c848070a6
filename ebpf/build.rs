use which::which;

/// Rebuild the eBPF object whenever bpf-linker changes (a new linker can change the output).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found in PATH: run scripts/setup.sh");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
