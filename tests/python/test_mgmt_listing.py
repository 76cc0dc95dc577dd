"""RabbitMQ 3.10's list parameters on the management API: sort (dotted too), sort_reverse,
page / page_size with the paged object, name + use_regex, columns (dotted too), disable_stats,
and RabbitMQ's errors for bad values. Every test passes against Debian's RabbitMQ 3.10.8
(WARREN_TEST_TARGET=rabbitmq): each works in a vhost of its own, so that other tests' objects
do not show."""

from urllib.parse import quote

import pytest

from mgmt_target import mgmt_target, vhost  # noqa: F401 (fixtures)


def declare(api, vhost, names):
    for n in names:
        api.ok("PUT", f"/api/queues/{vhost}/{quote(n, '')}", {"durable": False, "arguments": {}})


def names(items):
    return [i["name"] for i in items]


def test_queues_sort_by_name_then_reverse_and_by_a_key(mgmt_target, vhost):
    _, api = mgmt_target
    declare(api, vhost, ["b", "a", "C", "d"])
    api.ok("PUT", f"/api/queues/{vhost}/x", {"durable": True, "arguments": {}})
    # Default: by vhost then name, byte order (upper case first).
    assert names(api.get(f"/api/queues/{vhost}")) == ["C", "a", "b", "d", "x"]
    assert names(api.get(f"/api/queues/{vhost}?sort=name&sort_reverse=true")) == ["x", "d", "b", "a", "C"]
    # By a boolean key: false before true, ties by name.
    assert names(api.get(f"/api/queues/{vhost}?sort=durable")) == ["C", "a", "b", "d", "x"]
    assert names(api.get(f"/api/queues/{vhost}?sort=durable&sort_reverse=true"))[0] == "x"


def test_pages_carry_rabbitmqs_counts(mgmt_target, vhost):
    _, api = mgmt_target
    declare(api, vhost, [f"q{i:02}" for i in range(7)])
    page = api.get(f"/api/queues/{vhost}?page=2&page_size=3")
    assert {k: page[k] for k in page if k != "items"} == {
        "total_count": 7, "filtered_count": 7, "item_count": 3, "page": 2, "page_size": 3,
        "page_count": 3}
    assert names(page["items"]) == ["q03", "q04", "q05"]
    last = api.get(f"/api/queues/{vhost}?page=3&page_size=3")
    assert names(last["items"]) == ["q06"] and last["item_count"] == 1
    # page_size defaults to 100; a page just past the end is empty, further is an error.
    assert api.get(f"/api/queues/{vhost}?page=1")["page_size"] == 100
    empty = api.get(f"/api/queues/{vhost}?page=2&page_size=7")
    assert empty["items"] == [] and empty["item_count"] == 0 and empty["page_count"] == 1
    status, body = api.call("GET", f"/api/queues/{vhost}?page=3&page_size=7")
    assert (status, body) == (400, {"error": "page_out_of_range",
                                    "reason": "Page out of range, page: 3 page size: 7, len: 7"})


def test_name_filter_substring_ignoring_case_or_regex(mgmt_target, vhost):
    _, api = mgmt_target
    declare(api, vhost, ["orders.eu", "orders.us", "Billing", "audit"])
    page = api.get(f"/api/queues/{vhost}?page=1&name=ORDERS")
    assert names(page["items"]) == ["orders.eu", "orders.us"]
    assert (page["total_count"], page["filtered_count"]) == (4, 2)
    page = api.get(f"/api/queues/{vhost}?page=1&name={quote('^(billing|audit)$')}&use_regex=true")
    assert names(page["items"]) == ["Billing", "audit"]
    # Without use_regex the pattern is text; without a page, name is ignored.
    assert api.get(f"/api/queues/{vhost}?page=1&name={quote('^audit')}")["filtered_count"] == 0
    assert len(api.get(f"/api/queues/{vhost}?name=orders")) == 4


def test_columns_keep_keys_and_dotted_paths(mgmt_target, vhost):
    _, api = mgmt_target
    declare(api, vhost, ["c1"])
    api.ok("PUT", f"/api/queues/{vhost}/c2", {"durable": False, "arguments": {"x-max-length": 5}})
    rows = api.get(f"/api/queues/{vhost}?columns=name,arguments.x-max-length")
    assert rows == [{"name": "c1", "arguments": {}}, {"name": "c2", "arguments": {"x-max-length": 5}}]
    page = api.get(f"/api/queues/{vhost}?columns=name&page=1&page_size=1")
    assert page["items"] == [{"name": "c1"}] and page["total_count"] == 2
    # Other list endpoints take them too.
    xs = api.get(f"/api/exchanges/{vhost}?columns=name,type&sort=name&sort_reverse=true")
    assert xs[0] == {"name": "amq.topic", "type": "topic"}
    vs = api.get(f"/api/vhosts?columns=name&page=1&name={vhost}")
    assert vs["items"] == [{"name": vhost}]


def test_disable_stats_leaves_the_basic_fields(mgmt_target, vhost):
    _, api = mgmt_target
    declare(api, vhost, ["s1"])
    [q] = api.get(f"/api/queues/{vhost}?disable_stats=true")
    assert {"name", "vhost", "durable", "auto_delete", "exclusive", "arguments", "node", "type"} <= q.keys()
    assert not {"messages", "message_stats", "messages_details", "consumers"} & q.keys()


@pytest.mark.parametrize("query,error,reason", [
    ("page=x", "bad_request", "Pagination parameters are invalid"),
    ("page=", "bad_request", "Pagination parameters are invalid"),
    ("page_size=abc", "bad_request", "Pagination parameters are invalid"),
    ("page=0", "invalid_pagination_parameters",
     "Invalid pagination parameters: page number 0, page size undefined"),
    ("page=1&page_size=501", "invalid_pagination_parameters",
     "Invalid pagination parameters: page number 1, page size 501"),
    ("page=1&page_size=0", "invalid_pagination_parameters",
     "Invalid pagination parameters: page number 1, page size 0"),
])
def test_bad_list_parameters_are_rabbitmqs_400s(mgmt_target, query, error, reason):
    _, api = mgmt_target
    for path in ("/api/queues", "/api/exchanges", "/api/connections", "/api/channels", "/api/vhosts"):
        status, body = api.call("GET", f"{path}?{query}")
        assert (status, body) == (400, {"error": error, "reason": reason}), path


def test_a_bad_regex_is_a_400_once_there_is_a_name_to_match(mgmt_target, vhost):
    _, api = mgmt_target
    bad = f"/api/queues/{vhost}?page=1&use_regex=true&name=%28"
    assert api.get(bad)["items"] == []
    declare(api, vhost, ["r1"])
    assert api.call("GET", bad) == (400, {"error": "bad_request",
                                          "reason": "Pagination parameters are invalid"})


def test_lists_that_do_not_page_still_sort_and_select(mgmt_target, vhost):
    _, api = mgmt_target
    declare(api, vhost, ["b1", "b2"])
    api.ok("POST", f"/api/bindings/{vhost}/e/amq.direct/q/b2", {"routing_key": "k2", "arguments": {}})
    api.ok("POST", f"/api/bindings/{vhost}/e/amq.direct/q/b1", {"routing_key": "k1", "arguments": {}})
    rows = api.get(f"/api/bindings/{vhost}?columns=source,routing_key")
    assert rows == [{"source": "", "routing_key": "b1"}, {"source": "", "routing_key": "b2"},
                    {"source": "amq.direct", "routing_key": "k1"},
                    {"source": "amq.direct", "routing_key": "k2"}]
    # page does not apply to bindings: still a plain list.
    assert isinstance(api.get(f"/api/bindings/{vhost}?page=1"), list)
    perms = api.get(f"/api/vhosts/{vhost}/permissions?columns=user,vhost")
    assert perms == [{"user": "guest", "vhost": vhost}]
