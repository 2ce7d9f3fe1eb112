"""Two agents, two processes: a researcher reads a task and thinks about it in
latent space; its KV cache goes to a solver over shared memory (no copy on the
way), and the solver answers from it without re-reading the researcher's work.

    pip install ./avp-python
    python examples/python/pipeline.py [--steps 10] [--max-tokens 128]

Copy it: swap the task, the model ("smollm2", "qwen2.5-coder-0.5b", a GGUF path
or a Hugging Face directory) or the address (tcp://HOST:PORT across hosts).
"""
import argparse
import multiprocessing as mp
import os
import time

import avp_rs

TASK = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as "
    "many clips in May. How many clips did Natalia sell altogether in April and May?"
)


def researcher(address: str, model_name: str, steps: int) -> None:
    model = avp_rs.Model(model_name)
    tx = avp_rs.connect(address, agent_id="researcher", identity=model.identity)
    t = time.perf_counter()
    ctx = model.think(TASK, steps=steps)
    print(f"researcher: thought {steps} steps over {ctx.seq_len} positions "
          f"in {time.perf_counter() - t:.1f} s")
    ctx.send(tx)  # written straight into the solver's shared memory
    print(f"researcher: {tx.explain()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=128)
    a = p.parse_args()
    address = f"shm://avp-example-{os.getpid()}"

    model = avp_rs.Model(a.model)  # the solver, in this process
    listener = avp_rs.listen(address, agent_id="solver", identity=model.identity)
    agent = mp.get_context("spawn").Process(target=researcher, args=(address, a.model, a.steps))
    agent.start()
    rx = listener.accept(timeout=300)
    with rx.recv(timeout=600) as msg:
        print(f"solver: received {msg.nbytes / 2**20:.1f} MiB of KV cache "
              f"({msg.kv.num_layers} layers x {msg.kv.seq_len} positions)")
        ctx = model.context_from(msg)
    agent.join()
    t = time.perf_counter()
    answer = model.generate(TASK, context=ctx, max_tokens=a.max_tokens)
    print(f"solver ({time.perf_counter() - t:.1f} s): {answer}")


if __name__ == "__main__":
    main()
