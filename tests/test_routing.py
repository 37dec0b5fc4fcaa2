"""The routing check of the fold (tally.service.ingest.fold.RoutingCheck)
against Pulsar's key hash computed key by key (partition_of), the oracle."""
import numpy as np

from tally.core.definitions import Entity, Feature, FeatureView, Source
from tally.service.ingest.fold import RoutingCheck
from tally.service.pulsar.producer import partition_of

source = Source("s", "s", {"user": "int64", "ts": "int64"})
view = FeatureView("v", Entity("user"), source, [Feature("n", "count")])


def test_keys_of_the_partition_pass_and_others_are_refused_one_by_one():
    keys = np.arange(5000)
    owners = np.array([partition_of(str(k), 4) for k in keys])
    check = RoutingCheck(view, 2, 4)
    assert check.misrouted(keys[owners == 2]) == {}            # the sample finds nothing
    assert not check.seen_misrouted
    mixed = keys[:400]
    refused = check.misrouted(mixed)
    assert sorted(refused) == np.flatnonzero(owners[:400] != 2).tolist()
    assert check.seen_misrouted
    row = next(iter(refused))
    assert refused[row].startswith(f"misrouted: key 'user' belongs to partition "
                                   f"{owners[row]} of 4, not 2")
    # once one was found, every event is checked, not a sample
    lone = keys[owners != 2][:1]
    batch = np.concatenate([keys[owners == 2][:99], lone])
    assert list(check.misrouted(batch)) == [99]


def test_an_unpartitioned_topic_is_never_misrouted():
    assert RoutingCheck(view, 0, 1).misrouted(np.arange(100)) == {}
