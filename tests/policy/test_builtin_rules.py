"""The built-in rules of the spending policy (issue 13): the signer's fee, sighash, path,
change and network checks as rules of the engine, implicit from ``[policy]`` and tightened
by a policy file. Every PSBT is built by embit (an independent library); anyhsm's sighash
is not trusted to it, nor the reverse (the one signature checked here is a BIP143
ALL|ANYONECANPAY one, which embit computes correctly).

Through the library (``ops.psbt.sign_psbt``, ``ops.policy.check_psbt``), the metrics
listener and the real ``anyhsm`` command (``policy check --json``, ``psbt sign`` exit 7).
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator, Sequence

import pytest
from embit import script as escript
from embit.ec import PublicKey, Signature
from embit.networks import NETWORKS
from embit.psbt import PSBT, DerivationPath
from embit.transaction import Transaction, TransactionInput, TransactionOutput
from tests.conftest import PASSPHRASE
from tests.policy.conftest import Deployment, audit_entries
from tests.policy.embit_psbt import EmbitWallet, foreign_address
from tests.support.cli import cli

from anyhsm.errors import ConfigError, SigningPolicyError, SpendingPolicyRefused
from anyhsm.ops.policy import check_psbt, show_policy
from anyhsm.ops.psbt import sign_psbt

H = 0x80000000
ACCOUNT = (84 + H, 1 + H, 0 + H)
BUILTIN = ["network", "path", "sighash", "change", "fee"]
RNG = random.Random(13)
ALL_ACP = 0x81


def build(
    wallet: EmbitWallet,
    amount: int = 50_000,
    *,
    fee: int = 1_000,
    account: Sequence[int] = ACCOUNT,
    change: tuple[int, int] | None = (1, 7),
    sighash: int | None = None,
    xpub_network: str | None = None,
    to: str | None = None,
) -> str:
    """A PSBT (embit) spending one P2WPKH coin of ``wallet`` at ``account``/0/3 to ``to``
    (a foreign address by default), the rest minus ``fee`` to our key at
    ``account``/``change`` (None: no change output, the rest is fee too)."""
    root = wallet.root
    fp = root.my_fingerprint
    in_path = [*account, 0, 3]
    in_pub = root.derive(in_path).key.get_public_key()
    value = amount + fee + 30_000
    prev = Transaction(
        vin=[TransactionInput(RNG.randbytes(32), 0)],
        vout=[TransactionOutput(value, escript.p2wpkh(in_pub))],
    )
    vout = [TransactionOutput(amount, escript.address_to_scriptpubkey(to or foreign_address(RNG)))]
    if change is not None:
        ch_path = [*account, *change]
        ch_pub = root.derive(ch_path).key.get_public_key()
        vout.append(TransactionOutput(value - amount - fee, escript.p2wpkh(ch_pub)))
    tx = Transaction(vin=[TransactionInput(prev.txid(), 0, sequence=0xFFFFFFFD)], vout=vout)
    psbt = PSBT(tx)
    inp = psbt.inputs[0]
    inp.non_witness_utxo = prev
    inp.witness_utxo = prev.vout[0]
    inp.bip32_derivations[in_pub] = DerivationPath(fp, in_path)
    if sighash is not None:
        inp.sighash_type = sighash
    if change is not None:
        psbt.outputs[1].bip32_derivations[ch_pub] = DerivationPath(fp, ch_path)
    if xpub_network is not None:
        acct = root.derive(list(account)).to_public()
        acct.version = NETWORKS[xpub_network]["xpub"]
        psbt.xpubs[acct] = DerivationPath(fp, list(account))
    return psbt.to_string()


def refused(dep: Deployment, psbt: str, key: str = "hot") -> SpendingPolicyRefused:
    with pytest.raises(SpendingPolicyRefused) as e:
        sign_psbt(dep.hsm, psbt, key)
    assert e.value.exit_code == 7 and e.value.code == "spending_policy_refused"
    return e.value


def signed(dep: Deployment, psbt: str) -> int:
    return sign_psbt(dep.hsm, psbt, "hot").signed_inputs


def verdicts(dep: Deployment, psbt: str) -> dict[str, str]:
    return {r.name: r.decision for r in check_psbt(dep.hsm, psbt, "hot").rules}


BASE = """
[[rules]]
name = "base"
"""


# --- no policy: exactly today's signer --------------------------------------------------------


def test_without_a_policy_the_signer_refuses_as_before(dep: Deployment) -> None:
    cases = [
        (build(dep.wallet, fee=20_000_000), {"max-fee", "max-fee-rate"}),
        (build(dep.wallet, sighash=ALL_ACP), {"sighash"}),
        (build(dep.wallet, account=(84 + H, 0 + H, 0 + H)), {"input-path"}),
        (build(dep.wallet, xpub_network="main"), {"network"}),
    ]
    for psbt, rules in cases:
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(dep.hsm, psbt, "hot")
        assert type(e.value) is SigningPolicyError and e.value.code == "signing_policy"
        assert {d["rule"] for d in e.value.details} == rules
        assert e.value.message.startswith("signing refused: ")
        check = check_psbt(dep.hsm, psbt, "hot")
        assert check.decision == "refuse" and {r.name for r in check.rules} == rules
    res = check_psbt(dep.hsm, build(dep.wallet), "hot")
    assert [r.name for r in res.rules] == ["signing-policy"]
    # nothing was judged by a spending policy
    assert not [e for e in audit_entries(dep.config) if e["op"] == "policy_decision"]


# --- a policy that does not mention them: the implicit rules, as [policy] sets them -----------


def test_implicit_rules_are_reported_first_and_in_order(dep: Deployment) -> None:
    dep.set(BASE)
    check = check_psbt(dep.hsm, build(dep.wallet), "hot")
    assert check.decision == "allow"
    assert [r.name for r in check.rules] == [*BUILTIN, "base"]
    fee = next(r for r in check.rules if r.name == "fee")
    assert "policy.max_fee_sat = 10000000" in fee.reason
    assert signed(dep, build(dep.wallet)) == 1
    entry = [e for e in audit_entries(dep.config) if e["op"] == "policy_decision"][-1]
    assert entry["detail"]["rules"] == "network,path,sighash,change,fee,base"  # type: ignore[index]
    shown = show_policy(dep.hsm)
    assert [r["name"] for r in shown.builtin_rules] == BUILTIN
    assert shown.builtin_rules[4]["max_fee_sat"] == 10_000_000


@pytest.mark.parametrize(
    ("name", "kw", "check"),
    [
        ("fee", {"fee": 20_000_000}, "max-fee"),
        ("sighash", {"sighash": ALL_ACP}, "sighash"),
        ("path", {"account": (84 + H, 0 + H, 0 + H)}, "input-path"),
        ("network", {"xpub_network": "main"}, "network"),
    ],
)
def test_implicit_rule_refuses_through_the_engine(
    dep: Deployment, name: str, kw: dict[str, object], check: str
) -> None:
    from anyhsm.policy import events

    dep.set(BASE)
    seen: list[object] = []
    stop = events.subscribe(seen.append)
    try:
        err = refused(dep, build(dep.wallet, **kw))  # type: ignore[arg-type]
    finally:
        stop()
    assert err.rules == [name]
    assert f"refused by rule {name}: " in err.message and f"[{check}]" in err.message
    if name != "network":  # what would have to change: a [policy] setting or the PSBT
        assert "in the configuration" in err.message
    else:
        assert "nothing can allow another network's" in err.message
    (decision,) = seen
    assert decision.refusing == [name]  # type: ignore[attr-defined]
    entries = audit_entries(dep.config)
    decided = [e for e in entries if e["op"] == "policy_decision"][-1]
    assert decided["outcome"] == "refused" and decided["detail"]["refusing"] == name  # type: ignore[index]
    signer = [e for e in entries if e["op"] == "psbt_sign"][-1]
    assert signer["outcome"] == "refused" and signer["detail"]["rules"] == name  # type: ignore[index]
    assert verdicts(dep, build(dep.wallet, **kw))[name] == "refuse"  # type: ignore[arg-type]


def test_implicit_rules_are_not_relaxed_by_approvals_warn_or_scoping(
    dep: Deployment, approvers: list[object]
) -> None:
    from tests.policy.conftest import approvals_table

    dep.set(
        f"""
        [[rules]]
        name = "lenient"
        keys = ["someone-else"]
        action = "warn"

        [[rules]]
        name = "approved"
        max_per_tx_sat = 1
        approvals = {approvals_table(1)}
        """
    )
    err = refused(dep, build(dep.wallet, fee=20_000_000))
    assert err.rules[0] == "fee"


def test_the_signer_signs_nothing_on_a_builtin_refusal_whatever_the_gate_says(
    dep: Deployment,
) -> None:
    """Defence in depth: a gate that allows everything does not make the signer sign a
    PSBT that a built-in rule refused under [policy]."""
    from anyhsm.bitcoin.signer import sign_psbt as raw_sign
    from anyhsm.ops.psbt import parse_psbt

    told: list[BaseException | None] = []

    class Grant:
        def signed(self) -> None:
            raise AssertionError("signed")

        def failed(self, error: BaseException | None) -> None:
            told.append(error)

    class AllowAll:
        def authorize(self, spend: object) -> Grant:
            return Grant()

    psbt = parse_psbt(build(dep.wallet, fee=20_000_000))
    cfg = dep.hsm.config
    with pytest.raises(SigningPolicyError) as e:
        raw_sign(
            dep.hsm, psbt, "hot", policy=cfg.policy, network=dep.hsm.network, spending=AllowAll()
        )
    assert {d["rule"] for d in e.value.details} == {"max-fee", "max-fee-rate"}
    assert told and told[0] is e.value


# --- policy files tighten them ---------------------------------------------------------------


def test_fee_rule_tightens_per_key_and_can_warn(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "hot-fees"
        keys = ["hot"]
        max_fee_sat = 5_000
        max_fee_rate_sat_vb = 20

        [[rules]]
        name = "fee-watch"
        max_fee_sat = 2_000
        action = "warn"

        [[rules]]
        name = "cold-fees"
        keys = ["cold"]
        max_fee_sat = 1
        """
    )
    assert signed(dep, build(dep.wallet, fee=1_500)) == 1
    warned = check_psbt(dep.hsm, build(dep.wallet, fee=2_500), "hot")
    assert warned.decision == "warn"
    assert {r.name: r.decision for r in warned.rules}["fee-watch"] == "warn"
    assert signed(dep, build(dep.wallet, fee=2_500)) == 1
    err = refused(dep, build(dep.wallet, fee=6_000))
    assert err.rules == ["hot-fees"]
    assert "rules.hot-fees.max_fee_sat = 5000" in err.message
    v = verdicts(dep, build(dep.wallet, fee=6_000))
    assert v["fee"] == "allow" and v["hot-fees"] == "refuse" and "cold-fees" not in v


def test_sighash_rule_tightens_what_policy_allows(dep: Deployment) -> None:
    dep.reopen(allowed_sighash_types=(0, 1, ALL_ACP))
    dep.set(
        """
        [[rules]]
        name = "base"

        [[rules]]
        name = "only-all"
        keys = ["hot"]
        sighash_types = ["DEFAULT", "ALL"]
        """
    )
    err = refused(dep, build(dep.wallet, sighash=ALL_ACP))
    assert err.rules == ["only-all"] and "ALL|ANYONECANPAY is not allowed" in err.message
    assert verdicts(dep, build(dep.wallet, sighash=ALL_ACP))["sighash"] == "allow"
    assert signed(dep, build(dep.wallet, sighash=1)) == 1


def test_sighash_rule_allows_a_type_and_the_signature_is_real(dep: Deployment) -> None:
    dep.reopen(allowed_sighash_types=(0, 1, ALL_ACP))
    dep.set(
        """
        [[rules]]
        name = "acp-ok"
        sighash_types = ["ALL", "ALL|ANYONECANPAY"]
        """
    )
    b64 = build(dep.wallet, sighash=ALL_ACP)
    res = sign_psbt(dep.hsm, b64, "hot")
    assert res.signed_inputs == 1
    # checked by embit: the BIP143 ALL|ANYONECANPAY digest and the ECDSA signature
    out = PSBT.from_string(res.psbt.to_base64())
    ((pub, sig),) = out.inputs[0].partial_sigs.items()
    assert sig[-1] == ALL_ACP
    value = out.inputs[0].witness_utxo.value
    digest = out.tx.sighash_segwit(0, escript.p2pkh(pub), value, sighash=ALL_ACP)
    assert PublicKey.parse(pub.sec()).verify(Signature.parse(sig[:-1]), digest)


def test_path_rule_limits_a_key_to_one_account(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "account-0"
        keys = ["hot"]
        input_paths = ["m/84'/1'/0'"]
        """
    )
    assert signed(dep, build(dep.wallet)) == 1
    other = build(dep.wallet, account=(84 + H, 1 + H, 1 + H))
    err = refused(dep, other)
    assert err.rules == ["account-0"]
    assert "rules.account-0.input_paths" in err.message and "m/84'/1'/1'/0/3" in err.message
    assert verdicts(dep, other)["path"] == "allow"  # [policy]'s defaults allow it


def test_coin_type_rule_tightens_a_permissive_policy(dep: Deployment) -> None:
    dep.reopen(allowed_input_paths=("m/84'/*'/*'",))
    mainnet_coin = build(dep.wallet, account=(84 + H, 0 + H, 0 + H), change=(1, 2))
    dep.set(BASE)
    assert signed(dep, mainnet_coin) == 1  # [policy] allows any coin type here
    dep.set(
        """
        [[rules]]
        name = "regtest-only"
        coin_type = true
        """
    )
    err = refused(dep, mainnet_coin)
    assert err.rules == ["regtest-only"]
    assert "m/84'/0'/0'/0/3" in err.message and "coin type other than regtest's (1)" in err.message
    assert signed(dep, build(dep.wallet)) == 1


def test_change_rule_warns_under_policy_and_a_file_can_refuse(dep: Deployment) -> None:
    dep.set(BASE)
    receive = build(dep.wallet, change=(0, 9))  # our key, receive branch: not change
    check = check_psbt(dep.hsm, receive, "hot")
    change = next(r for r in check.rules if r.name == "change")
    assert check.decision == "warn" and change.decision == "warn"
    assert "change-path" in change.reason and check.amount == 50_000 + 1_000 + 30_000
    assert signed(dep, receive) == 1  # a warning, as without a policy
    dep.set(
        """
        [[rules]]
        name = "low-change"
        max_change_index = 10
        """
    )
    assert signed(dep, build(dep.wallet, change=(1, 9))) == 1
    err = refused(dep, build(dep.wallet, change=(1, 10)))
    assert err.rules == ["low-change"] and "max_change_index = 10" in err.message
    assert verdicts(dep, build(dep.wallet, change=(1, 10)))["change"] == "allow"


# --- how the policy file and [policy] combine --------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_fee_sat = 20_000_000", "above policy.max_fee_sat = 10000000"),
        ("max_fee_rate_sat_vb = 5000", "above policy.max_fee_rate_sat_vb = 1000"),
        ('sighash_types = ["ALL|ANYONECANPAY"]', "ALL|ANYONECANPAY, which policy.allowed"),
        ("max_change_index = 200000", "above policy.max_change_index = 100000"),
    ],
)
def test_loosening_beyond_policy_is_refused_by_policy_set(
    dep: Deployment, setting: str, message: str
) -> None:
    from anyhsm.ops.policy import set_policy

    path = dep.policy(f'[[rules]]\nname = "loose"\n{setting}\n')
    with pytest.raises(ConfigError) as e:
        set_policy(dep.hsm, path)
    assert message in e.value.message and "change [policy] itself" in (e.value.hint or "")
    assert not show_policy(dep.hsm).active


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('coin_type = true\naction = "warn"', "never only warns"),
        ('sighash_types = ["ALL", "SOMETIMES"]', "'SOMETIMES' is not one of"),
        ('input_paths = ["84/1"]', "starts with m/"),
        ("max_fee_rate_sat_vb = 0", "must be a number > 0"),
        ("max_fee_sat = 0", "must be an integer >= 1"),
    ],
)
def test_bad_builtin_settings_are_reported(table: str, message: str) -> None:
    from anyhsm.policy.rules import parse_policy
    from anyhsm.types import Network

    with pytest.raises(ConfigError) as e:
        parse_policy(f'[[rules]]\nname = "r"\n{table}\n'.encode(), Network.REGTEST)
    assert any(message in p for p in e.value.problems)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_names_are_reserved(name: str) -> None:
    from anyhsm.policy.rules import parse_policy
    from anyhsm.types import Network

    with pytest.raises(ConfigError) as e:
        parse_policy(f'[[rules]]\nname = "{name}"\n'.encode(), Network.REGTEST)
    assert "a rule the engine adds itself" in e.value.message


def test_conditions_needing_the_signers_facts_fail_closed_without_them(dep: Deployment) -> None:
    """A summary made elsewhere (no signer facts) cannot pass a path/sighash/change/coin
    condition."""
    from anyhsm.bitcoin.signer import analyse_psbt
    from anyhsm.ops.psbt import parse_psbt
    from anyhsm.policy.engine import evaluate
    from anyhsm.policy.rules import parse_policy
    from anyhsm.policy.state import PolicyState

    cfg = dep.hsm.config
    psbt = parse_psbt(build(dep.wallet))
    spend = analyse_psbt(dep.hsm, psbt, "hot", policy=cfg.policy, network=dep.hsm.network)
    for cond in ("input_paths = [\"m/84'/1'/0'\"]", "coin_type = true", "max_change_index = 50"):
        pol = parse_policy(f'[[rules]]\nname = "r"\n{cond}\n'.encode(), dep.hsm.network)
        decision = evaluate(pol, spend, PolicyState(), 0.0)
        assert decision.refused and decision.refusing == ["r"]
        assert "no facts" in decision.rules[-1].reason


# --- through the CLI ---------------------------------------------------------------------------


@pytest.fixture
def cli_dep(dep: Deployment) -> Iterator[Deployment]:
    dep.set(
        """
        [[rules]]
        name = "hot-fees"
        keys = ["hot"]
        max_fee_sat = 5_000
        """
    )
    dep.hsm.close()
    yield dep


def _run(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("--config", str(dep.config), "--json", *args, env={"ANYHSM_PASSPHRASE": PASSPHRASE})


def _file(dep: Deployment, name: str, psbt: str) -> str:
    p = dep.config.parent / name
    p.write_text(psbt)
    return str(p)


def test_cli_check_and_sign(cli_dep: Deployment) -> None:
    dep = cli_dep
    high = _file(dep, "high.psbt", build(dep.wallet, fee=6_000))
    absurd = _file(dep, "absurd.psbt", build(dep.wallet, fee=20_000_000))
    fine = _file(dep, "fine.psbt", build(dep.wallet, fee=1_000))

    r = _run(dep, "policy", "check", high, "--key", "hot")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["decision"] == "refuse"
    assert [x["name"] for x in out["rules"]] == [*BUILTIN, "hot-fees"]
    assert {x["name"]: x["decision"] for x in out["rules"]}["hot-fees"] == "refuse"

    r = _run(dep, "psbt", "sign", "hot", high)
    err = json.loads(r.stdout)["error"]
    assert r.returncode == 7 and err["code"] == "spending_policy_refused"
    assert err["rules"] == ["hot-fees"]

    r = _run(dep, "psbt", "sign", "hot", absurd)
    err = json.loads(r.stdout)["error"]
    assert r.returncode == 7 and err["rules"] == ["fee", "hot-fees"]
    assert "raise policy.max_fee_sat" in err["message"]

    r = _run(dep, "psbt", "sign", "hot", fine)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["signed_inputs"] == 1

    shown = json.loads(_run(dep, "policy", "show").stdout)
    assert [x["name"] for x in shown["builtin_rules"]] == BUILTIN
