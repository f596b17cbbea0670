"""A scripted engine process speaking the real protocol, for bridge and window tests that need
exact control (crash at a chosen token, an out-of-memory exit, a tool call) without MLX.

Run as ``python tests/app/fake_engine.py``. The last user message steers it:
  "crash"        -> SIGKILL itself after three answer tokens
  "oom"          -> print a MemoryError traceback after two tokens and exit 1
  "fatal"        -> send an error event with usable=false after two tokens, then wait
  "peer_lost"    -> as the real engine when another Mac's rank dies mid-answer: error peer_lost
                    (usable=false), done "error", then wait to be killed
  "peer_exit"    -> as a rank whose collective's watchdog expired: the stderr line, exit status 75
  "tool:NAME"    -> call tool NAME with {"path": "notes.txt"} ("tool:NAME {...}": with those arguments)
  "slow"         -> 100 tokens, 30 ms apart (to test Stop)
  "attack:TEXT"  -> TEXT as the thinking, as the answer (in 7-character pieces), as a tool call's
                    name and as its argument names and values (a hostile model's output)
Anything else is echoed back word by word after a short reasoning. After a tool result the
answer quotes the result. Started with MLX_RANK and MLX_HOSTFILE (several Macs), its loaded
event reports a rank per hostfile entry and its plan echoes the two variables. Loading a folder whose name starts with "bad" fails with an error
event naming a weight file, as the real engine does for a truncated shard.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.serving import protocol  # noqa: E402
from engine.serving.protocol import (  # noqa: E402
    ChatRequest,
    DoneEvent,
    ErrorEvent,
    HelloEvent,
    LiveFigures,
    LoadedEvent,
    LoadRequest,
    MessageFigures,
    PrefillEvent,
    ProgressEvent,
    StatsEvent,
    TokenTextEvent,
    ToolCallEvent,
)

_out_lock = threading.Lock()
_cancelled: set[str] = set()


def send(event: protocol.Event) -> None:
    with _out_lock:
        sys.stdout.write(protocol.encode(event))
        sys.stdout.flush()


def answer(request: ChatRequest) -> None:
    last = request.messages[-1]
    rid = request.id
    if last.role == "tool":
        words = [f"{w} " for w in f"The tool said: {last.content}".split(" ")]
        stream(rid, words, delay=0.005)
        return
    text = last.content
    if text.startswith("tool:"):
        send(TokenTextEvent(id=rid, text="Let me look.", kind="answer"))
        name, _, given = text[5:].strip().partition(" ")  # "tool:NAME {json}" passes those arguments
        arguments = json.loads(given) if given else {"path": "notes.txt"}
        send(ToolCallEvent(id=rid, call_id="call_1", name=name, arguments=arguments))
        send(DoneEvent(id=rid, finish_reason="tool_calls", figures=MessageFigures(generated_tokens=3)))
        return
    if text.startswith("attack:"):
        payload = text[7:]
        send(TokenTextEvent(id=rid, text=payload, kind="reasoning"))
        stream(rid, [payload[i : i + 7] for i in range(0, len(payload), 7)], delay=0.0, finish=False)
        send(ToolCallEvent(id=rid, call_id="call_attack", name=payload, arguments={"path": payload, payload: [payload]}))
        send(DoneEvent(id=rid, finish_reason="tool_calls", figures=MessageFigures(generated_tokens=3)))
        return
    if text == "crash":
        stream(rid, ["partial ", "answer ", "before "], delay=0.01, finish=False)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    if text == "oom":
        stream(rid, ["half ", "done "], delay=0.01, finish=False)
        time.sleep(0.1)
        sys.stderr.write("Traceback (most recent call last):\nMemoryError\n")
        sys.stderr.flush()
        os._exit(1)
    if text == "fatal":
        stream(rid, ["about ", "to "], delay=0.01, finish=False)
        send(ErrorEvent(code="out_of_memory", message="Out of memory while reading experts.", usable=False, id=rid))
        time.sleep(30)
    if text == "peer_lost":
        stream(rid, ["one ", "two "], delay=0.01, finish=False)
        send(ErrorEvent(code="peer_lost", usable=False, id=rid, message="rank 0 of 2: expert layer 3: [ring] "
                        "Connection reset by peer; another rank stopped"))
        send(DoneEvent(id=rid, finish_reason="error", figures=MessageFigures(generated_tokens=2)))
        time.sleep(30)
    if text == "peer_exit":
        stream(rid, ["one "], delay=0.01, finish=False)
        sys.stderr.write("error: rank 0/2: expert layer 1: no answer within 120 s; a peer rank died or cannot be "
                         "reached. Stopping this rank.\n")
        sys.stderr.flush()
        os._exit(75)
    if text == "longprompt":  # a long prefill: progress, then (unless stopped) the answer
        for layer in range(0, 61, 6):
            if rid in _cancelled:
                send(DoneEvent(id=rid, finish_reason="cancelled", figures=MessageFigures()))
                return
            send(PrefillEvent(id=rid, tokens_total=4096, tokens_done=4096 if layer == 60 else 0, layers_total=60,
                              layers_done=layer, fraction=layer / 60, bytes_read=layer * 70_000_000,
                              elapsed_s=layer * 0.5, seconds_left=(60 - layer) * 0.5 if layer else None))
            time.sleep(0.05)
        stream(rid, ["Read ", "it."], delay=0.01)
        return
    if text == "slow":
        stream(rid, [f"w{i} " for i in range(100)], delay=0.03)
        return
    send(TokenTextEvent(id=rid, text="Thinking about it.", kind="reasoning"))
    stream(rid, [f"{w} " for w in f"Echo: {text}".split(" ")], delay=0.005)


def stream(rid: str, pieces: list[str], delay: float, finish: bool = True) -> None:
    start = time.monotonic()
    for n, piece in enumerate(pieces, 1):
        if rid in _cancelled:
            send(DoneEvent(id=rid, finish_reason="cancelled", figures=MessageFigures(generated_tokens=n - 1)))
            return
        send(TokenTextEvent(id=rid, text=piece, kind="answer"))
        if n % 5 == 0:
            send(StatsEvent(id=rid, figures=LiveFigures(decode_tps=12.5, engine_read_bps=1.5e9,
                                                        generated_tokens=n, pressure_level="normal")))
        time.sleep(delay)
    if finish:
        elapsed = time.monotonic() - start
        send(DoneEvent(id=rid, finish_reason="stop", figures=MessageFigures(
            prompt_tokens=12, generated_tokens=len(pieces), prompt_tps=120.0, decode_tps=len(pieces) / max(elapsed, 1e-3),
            ttft_s=0.05, elapsed_s=elapsed, bytes_read=14_155_776, cache_hit_rate=0.25)))


def main() -> None:
    send(HelloEvent(pid=os.getpid()))
    workers: list[threading.Thread] = []
    for line in sys.stdin:
        if not line.strip():
            continue
        request = protocol.decode_request(line)
        if isinstance(request, LoadRequest) and Path(request.model_dir).name.startswith("bad"):
            send(ProgressEvent(stage="reading headers", fraction=0.0))  # the engine drops its model first
            send(ErrorEvent(code="corrupt_model", usable=True, message=f"{request.model_dir}/model-00001-of-00002"
                            ".safetensors: truncated safetensors file (1000 bytes, no header)"))
        elif isinstance(request, LoadRequest):
            send(ProgressEvent(stage="loading", fraction=0.5))
            plan: dict[str, object] = {"resident_bytes": 1000, "streamed_bytes": 5000}
            ranks = 1
            if os.environ.get("MLX_RANK") is not None and os.environ.get("MLX_HOSTFILE"):
                ranks = len(json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text()))
                plan.update(mlx_rank=os.environ["MLX_RANK"], mlx_hostfile=os.environ["MLX_HOSTFILE"])
            send(LoadedEvent(model_dir=request.model_dir, name=Path(request.model_dir).name or "fake",
                             model_type="fake_moe", num_layers=2, num_experts=4, experts_per_token=2,
                             supports_tools=True, plan=plan, ranks=ranks))
        elif isinstance(request, ChatRequest):
            worker = threading.Thread(target=answer, args=(request,), daemon=True)
            worker.start()
            workers.append(worker)
        elif isinstance(request, protocol.CancelRequest):
            _cancelled.add(request.id)
        elif isinstance(request, protocol.ShutdownRequest):
            break
        elif isinstance(request, protocol.UnloadRequest):
            send(protocol.UnloadedEvent())
        elif isinstance(request, protocol.ServeRequest):  # pretend to serve; the real server is tested in tests/engine
            send(protocol.ServerEvent(running=request.enabled, host=request.host if request.enabled else "",
                                      port=request.port if request.enabled else 0))


if __name__ == "__main__":
    main()
