//! Scoring: the last number of a GSM8K answer against the gold number; a HumanEval
//! completion run against its tests in a Python subprocess with a timeout and no
//! network.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The last number in `text` (commas and a trailing period removed), if any.
pub fn last_number(text: &str) -> Option<String> {
    let mut found = None;
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let digit_follows = chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c.is_ascii_digit()
            || (c == '.' && !cur.is_empty() && digit_follows)
            || (c == ',' && !cur.is_empty() && digit_follows)
            || (c == '-' && cur.is_empty() && digit_follows)
        {
            if c != ',' {
                cur.push(c);
            }
        } else if !cur.is_empty() {
            found = Some(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        found = Some(cur);
    }
    found
}

/// Whether `answer`'s last number equals `gold` numerically.
pub fn gsm8k_correct(answer: &str, gold: &str) -> bool {
    match (
        last_number(answer).and_then(|n| n.parse::<f64>().ok()),
        gold.parse::<f64>().ok(),
    ) {
        (Some(a), Some(g)) => (a - g).abs() < 1e-6,
        _ => false,
    }
}

/// The Python program a completion is judged by: the fenced code block when the
/// model wrote one (prefixed by the prompt when it lacks the function itself), else
/// the prompt followed by the completion.
pub fn humaneval_program(prompt: &str, completion: &str, entry_point: &str) -> String {
    let code = fenced(completion).unwrap_or(completion);
    if code.contains(&format!("def {entry_point}")) {
        // Keep the prompt's imports.
        let imports: String = prompt
            .lines()
            .filter(|l| l.starts_with("import ") || l.starts_with("from "))
            .map(|l| format!("{l}\n"))
            .collect();
        format!("{imports}{code}\n")
    } else {
        format!("{prompt}{code}\n")
    }
}

fn fenced(text: &str) -> Option<&str> {
    let start = text.find("```")?;
    let after = &text[start + 3..];
    let body = after.find('\n').map(|n| &after[n + 1..])?;
    Some(body.find("```").map_or(body, |end| &body[..end]))
}

/// Forbids sockets inside the judged program (a second line of defence where
/// network namespaces are unavailable).
const NO_NETWORK: &str = "import socket as _s\ndef _no(*a, **k):\n    raise OSError('network is disabled while judging')\n_s.socket = _no\n_s.create_connection = _no\n";

/// Whether `unshare -rn` works here (a private, empty network namespace).
fn netns_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        Command::new("unshare")
            .args(["-rn", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The result of judging one program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// All tests passed.
    Pass,
    /// A test failed or the program raised (first line of stderr).
    Fail(String),
    /// It ran past the timeout and was killed.
    Timeout,
}

/// Run `program` + `test` + `check(entry_point)` with `python` in a subprocess
/// (no network: an empty network namespace when available, and sockets disabled).
pub fn run_humaneval(
    python: &str,
    program: &str,
    test: &str,
    entry_point: &str,
    timeout: Duration,
) -> std::io::Result<Verdict> {
    let source = format!("{NO_NETWORK}\n{program}\n\n{test}\n\ncheck({entry_point})\n");
    let mut cmd = if netns_available() {
        let mut c = Command::new("unshare");
        c.args(["-rn", python]);
        c
    } else {
        Command::new(python)
    };
    let mut child = cmd
        .args(["-I", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(source.as_bytes())?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(Verdict::Pass);
            }
            let mut err = String::new();
            use std::io::Read;
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            let last = err.lines().last().unwrap_or("failed").to_owned();
            return Ok(Verdict::Fail(last));
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Verdict::Timeout);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_number_reads_the_final_answer() {
        assert_eq!(
            last_number("She sold 48 + 24 = 72 clips."),
            Some("72".into())
        );
        assert_eq!(
            last_number("The total is $1,234.50."),
            Some("1234.50".into())
        );
        assert_eq!(last_number("It drops to -5 degrees"), Some("-5".into()));
        assert_eq!(last_number("no digits"), None);
        assert!(gsm8k_correct("#### 72", "72"));
        assert!(gsm8k_correct("the answer is 72.0", "72"));
        assert!(!gsm8k_correct("the answer is 71", "72"));
    }

    #[test]
    fn programs_come_from_fences_or_continue_the_prompt() {
        let prompt =
            "from typing import List\n\ndef f(x: List[int]) -> int:\n    \"\"\"doc\"\"\"\n";
        let fenced = "Here:\n```python\ndef f(x):\n    return sum(x)\n```\nDone.";
        let p = humaneval_program(prompt, fenced, "f");
        assert!(p.starts_with("from typing import List\n"));
        assert!(p.contains("return sum(x)") && !p.contains("Done."));
        let body = "    return sum(x)\n";
        assert_eq!(
            humaneval_program(prompt, body, "f"),
            format!("{prompt}{body}\n")
        );
    }

    #[test]
    fn judging_passes_fails_times_out_and_has_no_network() {
        let python = "python3";
        let t = Duration::from_secs(10);
        let test = "def check(c):\n    assert c(2) == 4\n";
        let ok = run_humaneval(python, "def sq(x):\n    return x * x\n", test, "sq", t).unwrap();
        assert_eq!(ok, Verdict::Pass);
        let bad = run_humaneval(python, "def sq(x):\n    return x + 1\n", test, "sq", t).unwrap();
        assert!(matches!(bad, Verdict::Fail(_)), "{bad:?}");
        let slow = run_humaneval(
            python,
            "def sq(x):\n    while True:\n        pass\n",
            test,
            "sq",
            Duration::from_millis(500),
        )
        .unwrap();
        assert_eq!(slow, Verdict::Timeout);
        let net = "import socket\ndef sq(x):\n    socket.create_connection(('127.0.0.1', 9))\n    return x * x\n";
        let v = run_humaneval(python, net, test, "sq", t).unwrap();
        assert!(matches!(v, Verdict::Fail(_)), "{v:?}");
    }
}
