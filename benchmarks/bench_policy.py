"""Benchmark: the spending policy's cost per PSBT, as a share of the signing time.

A software-keystore deployment with one HD key and a realistic spending policy: 10 rules
(a 1,000-address allowlist, per-transaction, per-hour and per-day limits, output shape,
OP_RETURN, own outputs, a time window, a warn rule, a rule for another key), set with
``ops.policy.set_policy`` as an operator would. For a 1-input and a 100-input P2WPKH PSBT
(every signing a new transaction, so each one is really debited), rows timed in turn,
round after round in alternating order (load from other processes moves them alike), 40
signings of a 1-input PSBT (or one of a 100-input PSBT) per row and round, the share the
median of the rounds' own shares:

- *signing alone*: the library's signer (``anyhsm.bitcoin.signer.sign_psbt``) with no
  spending gate: what ``psbt sign`` cost before the policy;
- *signing + policy*: the same with the gate of the deployment, built per signing as the
  one signing path (``ops.psbt.sign_psbt``) does: the active policy checked against its
  binding (file read, SHA-256, MAC), then one state transaction (lock, read and MAC-check
  the state, evaluate the 10 rules, debit, write, the decision's audit entry);
- the parts, timed alone (the same number per round, each on a new transaction):
  building the gate, evaluating the rules (pure), and one state transaction with its
  audit entry;
- the floor: the system calls and crypto of one decision written inline, with no layer
  (:func:`policy_floor`), as a share of the 1-input signing: what the guarantees
  themselves cost, the rest being the engine's Python structure.

Target (issue 13): the policy adds less than 10% to the signing time.

Run: ``.venv/bin/python benchmarks/bench_policy.py [--rounds 15] [--clock cpu]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_psbt import build

from anyhsm.bitcoin.address import address_from_script
from anyhsm.bitcoin.psbt import Psbt
from anyhsm.bitcoin.signer import analyse_psbt, sign_psbt
from anyhsm.config import Config
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.hsm import Hsm, open_hsm
from anyhsm.ops.policy import set_policy
from anyhsm.policy.enforce import PolicyGate, load_active, spending_gate, state_store
from anyhsm.policy.engine import evaluate
from anyhsm.policy.gate import SpendSummary
from anyhsm.policy.state import PolicyState
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType, Network

PASSPHRASE = "benchmark passphrase, long enough for the keystore"
SEED = bytes(range(32))
TARGET = 0.10


def policy_text(destinations: list[str], rng: random.Random) -> str:
    others = [
        address_from_script(bytes([0, 20]) + rng.randbytes(20), Network.REGTEST)
        for _ in range(1000 - len(destinations))
    ]
    listed = "\n".join(f'  "{a}",' for a in [*others, *destinations])
    return f"""
[[rules]]
name = "allowlist"
keys = ["hot"]
destinations = [
{listed}
]

[[rules]]
name = "per-tx"
keys = ["hot"]
max_per_tx_sat = 100_000_000_000

[[rules]]
name = "hourly"
keys = ["hot"]
max_per_period_sat = 10_000_000_000_000
period = "1h"
buckets = 60

[[rules]]
name = "daily"
keys = ["hot"]
max_per_period_sat = 100_000_000_000_000
period = "24h"

[[rules]]
name = "shape"
keys = ["hot"]
script_types = ["p2wpkh", "p2tr"]
max_outputs = 10
max_inputs = 500

[[rules]]
name = "no-op-return"
op_return = false

[[rules]]
name = "no-self"
own_outputs = false

[[rules]]
name = "hours"
hours = "00:00-24:00"
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

[[rules]]
name = "large"
max_per_tx_sat = 1_000_000_000_000
action = "warn"

[[rules]]
name = "cold"
keys = ["cold"]
max_per_tx_sat = 0
"""


def deployment(directory: Path) -> Hsm:
    cfg_path = init_deployment(
        directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF, network=Network.REGTEST
    )
    hsm = open_hsm(Config.load(cfg_path, env={}), passphrase=PASSPHRASE)
    hsm.import_key("hot", SEED, KeyType.BIP32)
    return hsm


def variants(psbt: Psbt, n: int) -> list[Psbt]:
    """``n`` copies of ``psbt`` paying 1..n sat less: each a new transaction."""
    out = []
    for k in range(n):
        p = psbt.copy()
        p.outputs[0].amount -= k + 1
        out.append(p)
    return out


CLOCK: Callable[[], float] = time.perf_counter


def timed(fn: Callable[[], object]) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def settle(directory: Path) -> None:
    """Wait until the state directory's last change is older than the racy interval, as
    in a deployment whose policy was set more than two seconds ago: until then the store
    looks at its files by path on every transaction (anyhsm.policy.state._Files), which
    costs a few system calls more."""
    import os

    from anyhsm.policy.state import _RACY_NS

    st = os.stat(directory)
    age = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns)
    if age <= _RACY_NS:
        time.sleep((_RACY_NS - age) / 1e9 + 0.05)


def bench(hsm: Hsm, n: int, rounds: int) -> dict[str, float]:
    """Per round, ``k`` signings alone and ``k`` with the policy, each block timed whole,
    in alternating order (a machine whose speed drifts favours neither); the share is
    the median of the rounds' own shares, the times the medians per PSBT."""
    cfg = hsm.config
    base, _ = build("p2wpkh", SEED, n)
    k = max(1, 40 // n)
    # warm caches (the parsed policy, imports) outside the timing, as a long-lived process has
    psbts = variants(base, 2 * k * rounds + 2)
    kw = {"policy": cfg.policy, "network": hsm.network, "environment": cfg.environment}
    sign_psbt(hsm, psbts.pop(), "hot", **kw, spending=spending_gate(hsm))
    sign_psbt(hsm, psbts.pop(), "hot", **kw)
    rows: dict[str, list[float]] = {
        name: [] for name in ("plain", "policy", "share", "gate", "eval", "txn")
    }
    active = load_active(hsm)
    assert active is not None
    settle(active.directory)
    store = state_store(hsm, active.directory)
    gate = PolicyGate(hsm, active, store)
    # the parts: each state transaction debits a new transaction too (as signing does)
    fresh = variants(base, 2 * k * rounds + 2 + k * rounds)[-k * rounds :]
    spends = [analyse_psbt(hsm, p, "hot", **kw) for p in fresh]
    for r in range(rounds):
        batch = spends[r * k : (r + 1) * k]
        plain, policy = [psbts.pop() for _ in range(k)], [psbts.pop() for _ in range(k)]

        def alone(batch: list[Psbt] = plain) -> None:
            for p in batch:
                sign_psbt(hsm, p, "hot", **kw)

        def with_policy(batch: list[Psbt] = policy) -> None:
            for p in batch:
                sign_psbt(hsm, p, "hot", **kw, spending=spending_gate(hsm))

        if r % 2:
            t_policy, t_plain = timed(with_policy), timed(alone)
        else:
            t_plain, t_policy = timed(alone), timed(with_policy)
        rows["plain"].append(t_plain / k)
        rows["policy"].append(t_policy / k)
        rows["share"].append((t_policy - t_plain) / t_plain)
        rows["gate"].append(timed(lambda: [spending_gate(hsm) for _ in range(k)]) / k)
        with store.transaction() as txn:
            state = txn.read()

        def rules(
            batch: list[SpendSummary] = batch, state: PolicyState = state, now: float = time.time()
        ) -> None:
            for spend in batch:
                evaluate(active.policy, spend, state, now)

        def transactions(batch: list[SpendSummary] = batch) -> None:
            for spend in batch:
                gate.authorize(spend).signed()

        rows["eval"].append(timed(rules) / k)
        rows["txn"].append(timed(transactions) / k)
    return {name: statistics.median(v) for name, v in rows.items()}


def policy_floor(directory: Path, spks: list[bytes], allowlist: frozenset[bytes], n: int) -> float:
    """Seconds per decision of the work every policy decision must do, written inline with
    no layer around it, as ``bench_core``'s floor is for a signature: the state's flock on
    a kept descriptor and the ``stat`` that shows the kept files are still the files,
    both slot headers read and compared with the known one, the 10 rules judged (the
    allowlist, two limits, two velocity counters of 61 and 25 buckets, shape, OP_RETURN,
    own outputs, time window, a warn rule), the debit into both counters and the bounded
    debit list, the record encoded, HMAC-SHA256-ed and written over the older slot, the
    unlock, and the decision's audit line (flock, tail check, canonical body, HMAC chained
    on the previous MAC, write, unlock). What the engine adds beyond this is the price of
    its Python structure."""
    import fcntl
    import hmac
    import os

    directory.mkdir()
    key, audit_key = os.urandom(32), os.urandom(32)
    lock = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    slots = [os.open(directory / f"state.{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in (0, 1)]
    log = os.open(directory / "audit.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    st = os.stat(directory)
    stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    hourly, daily = [0] * 61, [0] * 25
    newest = [int(time.time() // 60), int(time.time() // 3600)]
    debits = [f'"{"ab" * 32}:daily:{k}:0"' for k in range(64)]
    known = [b"", b""]
    chain = {"mac": bytes(32), "seq": 0, "end": 0, "state": 0}
    kinds = frozenset(("p2wpkh", "p2tr"))
    policy_sha = "cd" * 32
    inputs = 1

    def decide(txid: str, amount: int) -> None:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            s = os.stat(directory)
            if (s.st_ino, s.st_mtime_ns, s.st_ctime_ns) != stamp:
                raise RuntimeError("the floor's directory changed under it")
            for i in (0, 1):
                head = os.pread(slots[i], 4096, 0).partition(b"\n")[0]
                if not hmac.compare_digest(head, known[i]):
                    raise RuntimeError("the floor's state changed under it")
            now = time.time()
            leaving = amount + 200
            ok = all(spk in allowlist for spk in spks) and leaving <= 100_000_000_000
            for buckets, width, at, limit in (
                (hourly, 60, 0, 10_000_000_000_000),
                (daily, 3600, 1, 100_000_000_000_000),
            ):
                index = int(now // width)
                if index > newest[at]:
                    shift = min(index - newest[at], len(buckets))
                    del buckets[:shift]
                    buckets.extend([0] * shift)
                    newest[at] = index
                ok = ok and sum(buckets) + leaving <= limit
            t = int(now)
            minute, day = (t // 60) % 1440, (t // 86400 + 3) % 7
            ok = ok and inputs <= 500 and len(spks) <= 10 and {"p2wpkh"} <= kinds
            ok = ok and 0 <= minute < 1440 and day in range(7) and leaving <= 10**12
            if not ok:
                raise RuntimeError("the floor's spend was refused")
            hourly[-1] += leaving
            daily[-1] += leaving
            debits.extend(
                (f'"{txid}:hourly:{leaving}:{newest[0]}"', f'"{txid}:daily:{leaving}:{newest[1]}"')
            )
            del debits[:-64]
            chain["state"] += 1
            seq = chain["state"]
            body = (
                f'{{"counters":{{"daily":{{"buckets":[{",".join(map(str, daily))}],'
                f'"newest":{newest[1]},"period":86400,"width":3600}},"hourly":{{"buckets":'
                f'[{",".join(map(str, hourly))}],"newest":{newest[0]},"period":3600,'
                f'"width":60}}}},"debits":[{",".join(debits)}],"frozen":{{}},"pending":[],'
                f'"seq":{seq},"used":{{}}}}'
            ).encode()
            mac = hmac.digest(key, b"anyhsm/v1/policy-state\x00%d\x00" % seq + body, "sha256")
            head = f"anyhsm-policy-state/1 {seq} {len(body)} {mac.hex()}".encode()
            slot = seq % 2
            os.pwrite(slots[slot], head + b"\n" + body, 0)
            known[slot] = head
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        fcntl.flock(log, fcntl.LOCK_EX)
        try:
            if os.lseek(log, 0, os.SEEK_END) != chain["end"]:
                raise RuntimeError("the floor's log changed under it")
            chain["seq"] += 1
            entry = (
                f'{{"detail":{{"amount":"{leaving}","debits":"hourly:{leaving},daily:{leaving}",'
                f'"decision":"allow","fee":"200","keys":"hot","policy":"{policy_sha}",'
                '"rules":"network,path,sighash,change,fee,allowlist,per-tx,hourly,daily,'
                f'shape,no-op-return,no-self,hours,large","state_seq":"{seq}","txid":"{txid}"}},'
                f'"op":"policy_decision","outcome":"ok","pid":1,"seq":{chain["seq"]},'
                f'"ts":"{time.time_ns()}","uid":0}}'
            ).encode()
            chain["mac"] = hmac.digest(audit_key, chain["mac"] + entry, "sha256")
            line = entry[:-1] + b',"mac":"' + chain["mac"].hex().encode() + b'"}\n'
            os.write(log, line)
            chain["end"] += len(line)
        finally:
            fcntl.flock(log, fcntl.LOCK_UN)

    try:
        txids = [os.urandom(32).hex() for _ in range(n)]
        decide(txids[0], 1)  # the slots hold a record
        decide(txids[0], 1)
        t = CLOCK()
        for k, txid in enumerate(txids):
            decide(txid, 100_000 + k)
        return (CLOCK() - t) / n
    finally:
        for fd in (lock, *slots, log):
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time (on a machine busy with other work)",
    )
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        hsm = deployment(Path(tmp) / "dep")
        try:
            dests = []
            for n in (1, 100):
                dest = address_from_script(
                    build("p2wpkh", SEED, n)[0].outputs[0].script, Network.REGTEST
                )
                assert dest is not None
                dests.append(dest)
            policy = Path(tmp) / "spending.toml"
            policy.write_text(policy_text(dests, random.Random(1)))
            set_policy(hsm, policy)
            print(
                "spending policy: 10 rules, 1,000-address allowlist; median of",
                args.rounds,
                "rounds",
            )
            print(
                f"{'inputs':>6} {'signing':>10} {'+policy':>10} {'share':>7} "
                f"{'gate':>8} {'eval':>8} {'txn':>8}  target < {TARGET:.0%}"
            )
            ok = True
            plain_1 = 0.0
            for n in (1, 100):
                r = bench(hsm, n, args.rounds)
                share = r["share"]
                ok = ok and share < TARGET
                plain_1 = plain_1 or r["plain"]
                print(
                    f"{n:>6} {r['plain'] * 1e3:>8.2f}ms {r['policy'] * 1e3:>8.2f}ms {share:>6.1%} "
                    f"{r['gate'] * 1e3:>6.2f}ms {r['eval'] * 1e3:>6.3f}ms {r['txn'] * 1e3:>6.2f}ms"
                    f"  {'PASS' if share < TARGET else 'MISS'}"
                )
            spk = build("p2wpkh", SEED, 1)[0].outputs[0].script
            rng = random.Random(2)
            allowlist = frozenset([spk, *(bytes([0, 20]) + rng.randbytes(20) for _ in range(999))])
            floor = statistics.median(
                policy_floor(Path(tmp) / f"floor{k}", [spk], allowlist, 300)
                for k in range(args.rounds)
            )
            print(
                f"  floor (the same work inline, no layers): {floor * 1e6:.1f} µs per decision"
                f" = {floor / plain_1:.1%} of 1-input signing"
            )
        finally:
            hsm.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
