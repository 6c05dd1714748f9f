"""The operator's own indexes: a LIST at start, then watch events; a copy older than the one
kept never replaces it, a delete of a name made again does not drop the new object, a new
LIST drops what is gone. No kopf index: its start-up barrier grows with the cube of the number
of objects (docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

from mailkube_core.settings import OperatorSettings
from mailkube_operator.registry import build_registry
from mailkube_operator.store import Store, Stores


def body(name: str, rv: str, uid: str = "u1", **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "namespace": "mail", "uid": uid, "resourceVersion": rv}
    return {"metadata": {**meta, **extra.pop("meta", {})}, **extra}


def spec_of(b: dict[str, Any]) -> Any:
    return b.get("spec")


def test_a_newer_copy_replaces_an_older_one_never_the_reverse() -> None:
    store: Store[Any] = Store(spec_of)
    assert store.put(body("a", "5", spec={"v": 5}))
    assert not store.put(body("a", "4", spec={"v": 4}))  # a late event of an older version
    assert store.index == {("mail", "a"): [{"v": 5}]}
    assert store.put(body("a", "7", spec={"v": 7}))
    # made again under the same name: another uid, whatever its version
    assert store.put(body("a", "6", uid="u2", spec={"v": "new"}))
    assert store.index[("mail", "a")] == [{"v": "new"}]


def test_a_delete_drops_only_the_object_it_names() -> None:
    store: Store[Any] = Store(spec_of)
    store.put(body("a", "5", uid="u2", spec={}))
    assert not store.remove(body("a", "3", uid="u1"))  # the old object's delete, late
    assert ("mail", "a") in store.index
    assert store.remove(body("a", "6", uid="u2"))
    assert store.index == {}


def test_a_new_list_drops_what_is_gone_and_keeps_what_is_newer() -> None:
    store: Store[Any] = Store(spec_of)
    store.put(body("gone", "3", spec={}))
    store.put(body("newer", "12", uid="u3", spec={"v": 12}))
    store.put(body("kept", "4", uid="u4", spec={"v": 4}))
    changed = store.replace_all([body("kept", "9", uid="u4", spec={"v": 9})], "10")
    assert changed
    assert store.index == {("mail", "kept"): [{"v": 9}], ("mail", "newer"): [{"v": 12}]}
    assert not store.replace_all([body("kept", "9", uid="u4", spec={"v": 9}),
                                  body("newer", "12", uid="u3", spec={"v": 12})], "12")  # fmt: skip


def test_a_secret_moves_between_parts_when_its_dkim_label_changes() -> None:
    stores = Stores(fingerprint_key=lambda: b"k" * 32)
    plain = body("s", "1", data={"password": "cGFzcw=="})
    stores.secret_event(None, plain)
    assert ("mail", "s") in stores.password_secrets.index
    labelled = body("s", "2", data={"mailkube.rsa-sha256": "cGVt"},
                    meta={"labels": {"mailkube.io/dkim-for": "d"}})  # fmt: skip
    stores.secret_event("MODIFIED", labelled)
    assert ("mail", "s") not in stores.password_secrets.index
    assert stores.dkim_secrets.index[("mail", "s")] == [{"mailkube.rsa-sha256": "pem"}]
    stores.secret_event("DELETED", labelled)
    assert stores.dkim_secrets.index == {}


def test_no_kopf_index_holds_the_start_back() -> None:
    registry = build_registry(OperatorSettings(hostname="op.example.test"))
    assert list(registry._indexing.get_all_handlers()) == []


def test_the_index_records_the_keys_changed_and_a_list_of_the_same_versions_changes_none() -> None:
    store: Store[Any] = Store(spec_of)
    assert store.replace_all([body("a", "5", spec={"v": 5}), body("b", "6", spec={})], "9")
    assert store.index.take() == {("mail", "a"), ("mail", "b")}
    assert store.index.take() == set()  # taken: nothing since
    kept = store.index[("mail", "a")][0]
    # the periodic LIST: the same versions, one object newer, one gone
    assert store.replace_all([body("a", "5", spec={"v": 5}), body("c", "8", spec={})], "10")
    assert store.index.take() == {("mail", "b"), ("mail", "c")}
    assert store.index[("mail", "a")][0] is kept  # not copied again
    store.put(body("a", "11", spec={"v": 11}))
    store.remove(body("c", "12"))
    assert store.index.take() == {("mail", "a"), ("mail", "c")}


def test_the_echo_of_our_own_status_write_is_kept_but_not_recorded_as_a_change() -> None:
    """The copy an echo brings is kept (it holds the status written), but is no change for
    the next reconcile to look at: after 1,000 MailDomains' first statuses, the next MailUser
    change would otherwise walk every object. A change recorded before the echo stays."""
    store: Store[Any] = Store(spec_of)
    store.put(body("a", "1", spec={"v": 1}))
    store.put(body("b", "1", spec={"v": 1}))
    store.index.take()
    assert store.put(body("a", "2", spec={"v": 1}, status={"ok": True}), echo=True)
    assert store.index[("mail", "a")] == [{"v": 1}]
    assert store.index.take() == set()
    store.put(body("b", "2", spec={"v": 2}))  # a real change, not reconciled yet
    store.put(body("b", "3", spec={"v": 2}), echo=True)
    assert store.index.take() == {("mail", "b")}
