//! `avp bench report --input`: the page and its plots from bench lines.

use std::process::Command;

#[test]
fn report_plots_transport_and_handoff_lines() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("results.jsonl");
    let mut lines = String::new();
    for (t, us) in [
        ("shm", 1.0),
        ("tcp", 40.0),
        ("raw_tcp", 35.0),
        ("memcpy", 0.5),
    ] {
        for (i, size) in [4096u64, 1 << 20, 64 << 20].iter().enumerate() {
            let p50 = us * (1 + i * 100) as f64;
            lines.push_str(&format!(
                "{{\"bench\":\"transport\",\"transport\":\"{t}\",\"size_bytes\":{size},\"p50_us\":{p50},\"p99_us\":{p50},\"gbps\":{}}}\n",
                *size as f64 / p50 / 1e3
            ));
        }
    }
    lines.push_str("{\"bench\":\"handoff\",\"context_tokens\":256,\"ttft_latent_ms\":237.1,\"ttft_text_ms\":1094.7}\n");
    lines.push_str("{\"bench\":\"handoff\",\"context_tokens\":1024,\"ttft_latent_ms\":405.8,\"ttft_text_ms\":6672.5}\n");
    std::fs::write(&input, lines).unwrap();
    let out_dir = dir.path().join("report");
    let out = Command::new(env!("CARGO_BIN_EXE_avp"))
        .args(["bench", "report", "--out"])
        .arg(&out_dir)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
    for svg in ["latency.svg", "throughput.svg", "ttft.svg"] {
        assert!(html.contains(svg), "{svg} linked");
        let body = std::fs::read_to_string(out_dir.join(svg)).unwrap();
        assert!(body.starts_with("<svg"), "{svg}");
        assert!(body.contains("<polyline"), "{svg} has lines");
    }
    let latency = std::fs::read_to_string(out_dir.join("latency.svg")).unwrap();
    for name in ["shm", "tcp", "raw_tcp", "memcpy"] {
        assert!(latency.contains(&format!(">\n{name}\n<")), "legend {name}");
    }
    let ttft = std::fs::read_to_string(out_dir.join("ttft.svg")).unwrap();
    assert!(ttft.contains("latent (KV cache over shm)") && ttft.contains("text (re-prefill)"));
    assert!(html.contains("cores"), "the machine is recorded");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("results.jsonl"))
            .unwrap()
            .lines()
            .count(),
        14
    );
}

#[test]
fn report_without_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty.jsonl");
    std::fs::write(&input, "not json\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_avp"))
        .args(["bench", "report", "--out"])
        .arg(dir.path().join("r"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
