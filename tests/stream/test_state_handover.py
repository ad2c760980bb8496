"""User state follows its partition to another worker (``stream.changelog``).

Two ``slidr worker`` processes of one group, each with a state directory of its own (two
hosts, as far as state goes), split the partitions; one is killed with SIGKILL and the
other takes its partitions over, restoring them from the changelog topic. Its decisions
and served features for the moved users equal batch scoring's on the same clicks, and
the clicks redelivered after the kill, and the victim's last clicks sent again, get the
decision they had, from the restored index, never a second one decided on empty state.
"""

from __future__ import annotations

import zlib

import numpy as np

from features.definitions import FEATURE_NAMES
from models.batch_scoring import score_clicks
from models.registry import ModelRegistry
from stream.changelog import ensure_changelog
from stream.kafka import FEATURES_SERVED, state_changelog
from tests.stream.test_worker import DECIDE_S, JOIN_S, clicks_of, lockstep_chunks, wait_joined
from tests.stream.worker_harness import (
    DecisionReader,
    RecordProducer,
    TopicReader,
    click_record,
    split_between,
    unique,
    wait_until,
)

USER_FEATURES = [i for i, name in enumerate(FEATURE_NAMES) if name.startswith("u_")]


def test_a_killed_worker_s_partitions_move_with_their_state(
    worker_settings, workers, dataset, trained_model
) -> None:
    settings = worker_settings
    n = 3000
    clicks = clicks_of(dataset, 0, n)
    model = ModelRegistry(trained_model.registry).load()
    offline = score_clicks(model, dataset.clicks.take(np.arange(n)))
    partition_of = [zlib.crc32(c["user_id"].encode()) % settings.partitions for c in clicks]
    chunks = lockstep_chunks(clicks, settings.partitions)
    group = unique("g")
    # Separate homes: separate RocksDB state directories, as on two hosts.
    killed = workers.new("killed", group, SLIDR_LOG_FEATURES="true")
    survivor = workers.new("survivor", group, SLIDR_LOG_FEATURES="true")
    everyone = frozenset(range(settings.partitions))

    def split() -> bool:
        return split_between(killed, survivor, everyone)

    ensure_changelog(settings.replace(group_id=group))  # as the workers do, to read it
    reader = DecisionReader(settings)
    changelog = TopicReader(settings, state_changelog(group))
    producer = RecordProducer(settings)
    half = len(chunks) // 2
    try:
        killed.start()
        wait_joined(killed)
        survivor.start()
        assert wait_until(lambda: split() or not (killed.running and survivor.running), JOIN_S), (
            f"no split assignment:\n{workers.describe()}"
        )
        assignment = killed.assignment()
        assert assignment is not None
        moved = assignment[1]

        def decide(run: list[list[dict]], alive) -> None:
            for chunk in run:
                producer.send([click_record(c) for c in chunk])
                missing = reader.wait_for([c["click_id"] for c in chunk], DECIDE_S, alive)
                assert not missing, f"{len(missing)} clicks undecided:\n{workers.describe()}"

        decide(chunks[:half], lambda: killed.running and survivor.running)
        # Kill once the log holds every click the victim decided: what it decided is then
        # all acknowledged, its offsets maybe not all committed yet (redelivered).
        decided_there = {
            b"c:" + c["click_id"].encode()
            for chunk in chunks[:half]
            for c in chunk
            if zlib.crc32(c["user_id"].encode()) % settings.partitions in moved
        }
        assert changelog.read_until(
            lambda records: decided_there <= {r.key for r in records}, DECIDE_S
        ), "the changelog never got the victim's decisions"
        killed.kill()
        decided_at_kill = set(reader.by_click)
        # Offsets committed before the kill are not redelivered; a producer's resend of
        # the victim's last clicks is, whatever was committed: the survivor must find
        # their decisions in the index it restored.
        resent = [
            c
            for c in chunks[half - 1]
            if zlib.crc32(c["user_id"].encode()) % settings.partitions in moved
        ]
        assert resent, "the last chunk before the kill has no click of the moved partitions"
        producer.send([click_record(c) for c in resent])
        assert reader.read_until(
            lambda _records: all(len(reader.by_click[c["click_id"]]) >= 2 for c in resent),
            DECIDE_S,
            lambda: survivor.running,
        ), f"resent clicks not decided again:\n{workers.describe()}"
        decide(chunks[half:], lambda: survivor.running)
        served = TopicReader(settings, FEATURES_SERVED)
        served.read_until(lambda records: len(records) >= n, DECIDE_S)
    finally:
        producer.close()
        reader.close()
        changelog.close()
    assert survivor.running, workers.describe()

    # No click decided twice: a redelivered or resent one got its stored decision, byte
    # for byte (decided_at included).
    redelivered = [cid for cid, ds in reader.by_click.items() if len(ds) > 1]
    assert {c["click_id"] for c in resent} <= set(redelivered)
    assert all(
        all(d == reader.by_click[cid][0] for d in reader.by_click[cid]) for cid in redelivered
    ), "a redelivered click was decided again"
    rows = [r.json() for r in served.records]
    served.close()
    features = {}
    for row in rows:
        assert row["click_id"] not in features, f"{row['click_id']} was decided twice"
        features[row["click_id"]] = row["features"]
    assert len(features) == n

    # The moved users' clicks after the kill were decided on restored state: their user
    # features and scores are batch scoring's.
    after = [
        i
        for i, c in enumerate(clicks)
        if partition_of[i] in moved and c["click_id"] not in decided_at_kill
    ]
    assert after, "no click of the moved partitions came after the kill"
    online = np.array([features[clicks[i]["click_id"]] for i in after])
    np.testing.assert_allclose(
        online[:, USER_FEATURES], offline.features[after][:, USER_FEATURES], atol=1e-6
    )
    scores = np.array([reader.by_click[clicks[i]["click_id"]][0]["score"] for i in after])
    close = np.abs(scores - offline.scores[after]) <= 1e-5
    print(
        f"{len(after)} clicks of moved partitions {sorted(moved)} after the kill; "
        f"{len(redelivered)} redelivered or resent ({len(resent)} resent); "
        f"{close.sum()} scores within 1e-5"
    )
    assert close.mean() >= 0.999, f"{(~close).sum()} of {len(after)} scores differ"
    verdicts = [reader.by_click[clicks[i]["click_id"]][0]["verdict"] == "invalid" for i in after]
    assert (np.array(verdicts) == offline.invalid[after])[close].all()
