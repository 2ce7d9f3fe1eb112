"""The model layer from Python: the one-liner answers, and a context thought in
one process continues in another (needs the smollm2 model in avp's cache, which
`avp model fetch smollm2` puts there; CI fetches it first)."""
import os
import subprocess
import sys
import threading

import pytest

import avp_rs

PROMPT = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def model():
    return avp_rs.Model("smollm2")


def test_the_one_liner_answers_paris():
    answer = avp_rs.generate(PROMPT, model="smollm2", steps=4, max_tokens=16)
    assert "paris" in answer.lower(), answer


def test_a_context_crosses_processes_and_the_answer_is_the_same(model, tmp_path):
    ctx = model.think(PROMPT, steps=4)
    assert ctx.seq_len > 0 and ctx.num_steps == 4
    local = model.generate(PROMPT, context=ctx, max_tokens=16)
    listener = avp_rs.listen(f"shm://pytest-model-{os.getpid()}", identity=model.identity)
    sent = []

    def send():
        tx = avp_rs.connect(listener.address, identity=model.identity)
        ctx.send(tx, kv_dtype="float32")
        sent.append(tx.explain())

    t = threading.Thread(target=send)
    t.start()
    rx = listener.accept(timeout=30)
    with rx.recv(timeout=30) as msg:
        assert msg.kind == "kv_cache" and msg.kv.seq_len == ctx.seq_len
        received = model.context_from(msg)
    t.join()
    assert "mode latent" in sent[0]
    assert model.generate(PROMPT, context=received, max_tokens=16) == local
    # The same through bytes, and the reference's v1.
    again = model.context_from(avp_rs.decode(ctx.to_bytes()))
    assert model.generate(PROMPT, context=again, max_tokens=16) == local
    assert avp_rs.inspect(ctx.to_v1())["version"] == 1


def test_bad_model_names_are_errors():
    with pytest.raises(avp_rs.AvpError):
        avp_rs.Model("no-such-model")
    with pytest.raises(ValueError):
        avp_rs.Model("smollm2", device="tpu:0")


def test_the_example_pipeline_runs():
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "python", "pipeline.py"),
         "--steps", "2", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "transport shm" in out.stdout and "solver (" in out.stdout, out.stdout
