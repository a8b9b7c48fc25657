"""Hostfile parsing (file:line error messages) and mpirun's by-slot rank placement."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hvdhybrid.layout.hostfile import (
    Host,
    HostfileError,
    parse_hostfile,
    place_ranks,
    read_hostfile,
)


def test_good_file():
    text = ("# cluster\n"
            "\n"
            "node1 slots=4   # four GPUs\n"
            "   node2\n"
            "node-3.example.org slots = 2\n"
            "n4 slots=2 max_slots=8\n")
    assert parse_hostfile(text) == [Host("node1", 4), Host("node2", 1),
                                    Host("node-3.example.org", 2), Host("n4", 2)]


def test_read_hostfile(tmp_path):
    p = tmp_path / "hosts"
    p.write_text("localhost slots=4\n")
    assert read_hostfile(str(p)) == [Host("localhost", 4)]
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        read_hostfile(str(tmp_path / "missing"))


@pytest.mark.parametrize("bad_line", [
    "host:4", "node1 slots=0", "node1 slots=x", "node1 slots=-2", "node1 cpus=4",
    "node1 slots=2 extra", "-node", "node1 slots=\u00b2", "node1 slots=" + "9" * 5000,
], ids=lambda line: ascii(line[:24]))
def test_bad_line_names_path_and_line(bad_line):
    text = "# header\nok1 slots=2\n\n" + bad_line + "\nok2\n"
    with pytest.raises(HostfileError) as e:
        parse_hostfile(text, "conf/hosts")
    assert str(e.value).startswith("conf/hosts:4: ")


def test_duplicate_host():
    with pytest.raises(HostfileError, match=r"^hosts:3: .*listed twice"):
        parse_hostfile("a slots=2\nb\na slots=1\n", "hosts")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_empty_file(text):
    with pytest.raises(HostfileError, match=r"^my/hosts: no hosts"):
        parse_hostfile(text, "my/hosts")


def test_place_ranks_by_slot():
    hosts = [Host("a", 2), Host("b", 3), Host("c", 1)]
    assert place_ranks(hosts, 6) == ["a", "a", "b", "b", "b", "c"]
    assert place_ranks(hosts, 3) == ["a", "a", "b"]
    assert place_ranks(hosts, 1) == ["a"]


def test_place_ranks_too_few_slots():
    with pytest.raises(HostfileError) as e:
        place_ranks([Host("a", 2), Host("b", 1)], 4)
    msg = str(e.value)
    assert "-np 4" in msg and "has 3" in msg and "use -np 3" in msg


@settings(max_examples=400, deadline=None)
@given(st.text())
@example("a slots=\u00b2")            # a digit to str.isdigit() that int() rejects
@example("a slots=" + "1" * 5000)     # more digits than int() converts
def test_any_text_parses_or_hostfile_error(text):
    try:
        hosts = parse_hostfile(text, "h")
    except HostfileError:
        return
    assert hosts and all(isinstance(h.slots, int) and h.slots >= 1 for h in hosts)
    assert len({h.name for h in hosts}) == len(hosts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=1, max_size=5, unique=True)
       .flatmap(lambda names: st.tuples(st.just(names),
                                        st.lists(st.integers(1, 4), min_size=len(names),
                                                 max_size=len(names)))))
def test_generated_hostfiles_round_trip(names_slots):
    names, slots = names_slots
    text = "\n".join(f"{n} slots={s}" for n, s in zip(names, slots))
    assert parse_hostfile(text) == [Host(n, s) for n, s in zip(names, slots)]
