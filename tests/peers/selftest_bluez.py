#!/usr/bin/env python3
"""Self-test of bluez_mock.py: a D-Bus client on the mock's private bus doing what bluer does.

Run: python3 tests/peers/selftest_bluez.py   (with tests/requirements.txt installed: the mock
needs python-dbusmock, dbus-python and pycryptodome; this client uses dbus-fast, an independent
D-Bus implementation, so the wire types are checked as a strict client sees them). Exit 0 = pass.
Checks: the object tree (bluez5 template: AgentManager1, adapter hci0); SetDiscoveryFilter +
StartDiscovery (per-client InProgress); devices appear with InterfacesAdded and the exact D-Bus
types bluer reads (RSSI n, ManufacturerData a{qv} of ay, ServiceData a{sv} of ay); a missing
property is InvalidArgs; advert/sensor updates arrive as PropertiesChanged; Connect emits
Connected, the GATT objects and ServicesResolved before it returns; the Noke service and
characteristics are found by UUID (no AcquireNotify path: NotSupported); the session read
carries the battery; StartNotify + WriteValue of an offline unlock packet built here from the
session gives the 51 60 success notification as PropertiesChanged(Value); wrong key / stale time
give 51 61 (also a padlock's own clock_offset_s, and its refuse_packets list); the PROTOCOLS.md
test vector is accepted; online packets are accepted in order with a trailing server packet;
device-side disconnect, reconnect with cached GATT, sleep with the shutdown notification,
Connect to a sleeping padlock fails with org.bluez.Error.Failed le-connection-abort-by-local, a
wake during Connect completes it, StopDiscovery invalidates RSSI, remove/rediscover, a second
client's discovery session ends when it leaves the bus, bad ops give "error" events,
quit/SIGTERM exit 0 and take the bus down, --adv-interval-ms repeats adverts, restart
(bluetoothd goes and comes back).
"""

import asyncio
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time

from Crypto.Cipher import AES  # pycryptodome
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

HERE = os.path.dirname(os.path.abspath(__file__))

PADLOCK = "D0:1F:A6:44:B3:6F"
SENSOR = "A4:C1:38:00:00:01"
FOB = "C0:00:00:00:00:0F"
OFFLINE_KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
UNLOCK_CMD = bytes.fromhex("7E100230A230000000001122334455667788990A")
VEC_SESSION = bytes.fromhex("00112233445566778899AABBCCDDEEFF00112233")
VEC_PACKET = bytes.fromhex("7E1002306E198F06BE66D383D440552E6FC24C64")

NOKE_SERVICE = "1bc50001-0200-d29e-e511-446c609db825"
NOKE_TX = "1bc50002-0200-d29e-e511-446c609db825"
NOKE_RX = "1bc50003-0200-d29e-e511-446c609db825"
NOKE_SESSION = "1bc50004-0200-d29e-e511-446c609db825"
BTHOME = "0000fcd2-0000-1000-8000-00805f9b34fb"

ADAPTER = "/org/bluez/hci0"
DEV_IFACE = "org.bluez.Device1"
CHRC_IFACE = "org.bluez.GattCharacteristic1"
PROPS = "org.freedesktop.DBus.Properties"


def dev_path(mac):
    return ADAPTER + "/dev_" + mac.replace(":", "_")


def offline_packet(offline_key, unlock_cmd, session, unix_time):
    """The client side of the offline unlock (PROTOCOLS.md): header clear, AES inverse cipher."""
    key = bytes((offline_key[i] + session[i]) & 0xFF for i in range(16))
    p = bytearray(unlock_cmd[4:20])
    p[2:6] = struct.pack("<I", unix_time)
    p[15] = sum(p[:15]) & 0xFF
    return unlock_cmd[:4] + AES.new(key, AES.MODE_ECB).decrypt(bytes(p))


# ---------------------------------------------------------------------------------------------
class Peer:
    def __init__(self, args):
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "bluez_mock.py")] + args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.q = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            ev = json.loads(line)
            assert isinstance(ev["t"], float) and "mac" in ev and "ev" in ev, ev
            self.q.put(ev)

    def send(self, **op):
        self.p.stdin.write((json.dumps(op) + "\n").encode())
        self.p.stdin.flush()

    def raw(self, line):
        self.p.stdin.write(line)
        self.p.stdin.flush()

    def _wait(self, pred, timeout, what):
        for ev in self.seen:
            if pred(ev):
                self.seen.remove(ev)
                return ev
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timeout waiting for peer event {what}; unmatched: {self.seen}"
                )
            try:
                ev = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if pred(ev):
                return ev
            self.seen.append(ev)

    async def wait(self, pred, timeout=5.0, what=""):
        return await asyncio.to_thread(self._wait, pred, timeout, what)


def ev_is(name, mac=None, **kv):
    def pred(ev):
        if ev["ev"] != name or (mac is not None and ev["mac"] != mac):
            return False
        return all(ev.get(k) == v for k, v in kv.items())

    return pred


class Client:
    """A D-Bus client on the mock's bus (dbus-fast), collecting org.bluez signals."""

    def __init__(self, address):
        self.address = address
        self.signals = []
        self.cond = asyncio.Condition()

    async def start(self):
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.bus.add_message_handler(self._on_msg)
        await self.ok(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "AddMatch",
            "s",
            ["type='signal',sender='org.bluez'"],
        )
        return self

    def _on_msg(self, msg):
        if msg.message_type == MessageType.SIGNAL and msg.interface != "org.freedesktop.DBus":
            self.signals.append(msg)
            asyncio.get_running_loop().create_task(self._notify())
        return None

    async def _notify(self):
        async with self.cond:
            self.cond.notify_all()

    async def call(self, dest, path, iface, member, sig="", body=None):
        return await self.bus.call(
            Message(
                destination=dest,
                path=path,
                interface=iface,
                member=member,
                signature=sig,
                body=body or [],
            )
        )

    async def ok(self, dest, path, iface, member, sig="", body=None):
        r = await self.call(dest, path, iface, member, sig, body)
        assert r.message_type == MessageType.METHOD_RETURN, (member, path, r.error_name, r.body)
        return r.body

    async def bz(self, path, iface, member, sig="", body=None):
        return await self.ok("org.bluez", path, iface, member, sig, body)

    async def bz_err(self, path, iface, member, sig="", body=None):
        r = await self.call("org.bluez", path, iface, member, sig, body)
        assert r.message_type == MessageType.ERROR, (member, path, "expected an error", r.body)
        return r.error_name, (r.body[0] if r.body else "")

    async def get(self, path, iface, prop):
        (v,) = await self.bz(path, PROPS, "Get", "ss", [iface, prop])
        return v

    async def objects(self):
        (objs,) = await self.bz("/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        return objs

    async def sig(self, pred, timeout=5.0, what=""):
        """Wait for (and consume) the first collected signal matching pred."""
        end = time.monotonic() + timeout
        async with self.cond:
            while True:
                for m in self.signals:
                    if pred(m):
                        self.signals.remove(m)
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timeout waiting for signal {what}; have: "
                        f"{[(m.path, m.member, m.body) for m in self.signals]}"
                    )
                try:
                    await asyncio.wait_for(self.cond.wait(), left)
                except asyncio.TimeoutError:
                    pass

    def drain(self):
        self.signals.clear()


def props_changed(path, iface, key=None, value=None):
    def pred(m):
        if m.member != "PropertiesChanged" or m.path != path or m.body[0] != iface:
            return False
        if key is None:
            return True
        if value is None:
            return key in m.body[1] or key in m.body[2]
        return key in m.body[1] and m.body[1][key].value == value

    return pred


def added(path):
    return lambda m: m.member == "InterfacesAdded" and m.body[0] == path


def removed(path):
    return lambda m: m.member == "InterfacesRemoved" and m.body[0] == path


# ---------------------------------------------------------------------------------------------
async def scenario():
    assert (
        offline_packet(OFFLINE_KEY, UNLOCK_CMD, VEC_SESSION, 1700000000) == VEC_PACKET
    ), "test vector"

    peer = Peer(
        [
            "--padlock",
            f"{PADLOCK}::{OFFLINE_KEY.hex()}:battery=2950",
            "--sensor",
            SENSOR,
            "--fob",
            f"{FOB}:FOB1F_TEST",
            "--connect-timeout-ms",
            "400",
        ]
    )
    ready = await peer.wait(ev_is("ready"), what="ready")
    address = ready["address"]
    assert address.startswith("unix:path="), address
    assert [d["mac"] for d in ready["devices"]] == [PADLOCK, SENSOR, FOB], ready
    assert ready["devices"][0]["name"] == "NOKE3P_D01FA644B36F", ready
    c = await Client(address).start()
    pl, sn, fb = dev_path(PADLOCK), dev_path(SENSOR), dev_path(FOB)

    # --- object tree as bluer's Session::default_adapter sees it ---
    objs = await c.objects()
    assert "org.bluez.AgentManager1" in objs["/org/bluez"], objs.keys()
    ad = objs[ADAPTER]["org.bluez.Adapter1"]
    assert ad["Powered"] == Variant("b", True) and ad["Discovering"] == Variant("b", False), ad
    assert ad["Address"].signature == "s" and ad["Class"].signature == "u", ad
    assert not any("/dev_" in p for p in objs), objs.keys()
    await c.bz(
        "/org/bluez",
        "org.bluez.AgentManager1",
        "RegisterAgent",
        "os",
        ["/test/agent", "NoInputNoOutput"],
    )

    # --- discovery (bluer: SetDiscoveryFilter then StartDiscovery) ---
    await c.bz(
        ADAPTER,
        "org.bluez.Adapter1",
        "SetDiscoveryFilter",
        "a{sv}",
        [{"UUIDs": Variant("as", []), "Transport": Variant("s", "le")}],
    )
    f = await peer.wait(ev_is("discovery_filter"), what="filter")
    assert f["filter"] == {"UUIDs": [], "Transport": "le"}, f
    await c.bz(ADAPTER, "org.bluez.Adapter1", "StartDiscovery")
    await c.sig(
        props_changed(ADAPTER, "org.bluez.Adapter1", "Discovering", True), what="Discovering true"
    )
    await peer.wait(ev_is("discovery", state="started"), what="discovery started")
    name, _ = await c.bz_err(ADAPTER, "org.bluez.Adapter1", "StartDiscovery")
    assert name == "org.bluez.Error.InProgress", name
    m = await c.sig(added(pl), what="padlock added")
    props = m.body[1][DEV_IFACE]
    assert (
        props["Address"] == Variant("s", PADLOCK) and props["Name"].value == "NOKE3P_D01FA644B36F"
    ), props
    assert props["RSSI"].signature == "n" and props["RSSI"].value == -60, props["RSSI"]
    md = props["ManufacturerData"]
    assert md.signature == "a{qv}", md
    assert md.value == {0xFFFF: Variant("ay", bytes.fromhex("00020a"))}, md
    assert props["Connected"] == Variant("b", False) and props["ServicesResolved"] == Variant(
        "b", False
    )
    assert props["Adapter"] == Variant("o", ADAPTER), props
    assert "ServiceData" not in props, props
    m = await c.sig(added(sn), what="sensor added")
    sd = m.body[1][DEV_IFACE]["ServiceData"]
    assert sd.signature == "a{sv}" and sd.value == {
        BTHOME: Variant("ay", bytes.fromhex("4000010164026608"))
    }, sd
    m = await c.sig(added(fb), what="fob added")
    assert m.body[1][DEV_IFACE]["Name"].value == "FOB1F_TEST", m.body
    for mac in (PADLOCK, SENSOR, FOB):
        await peer.wait(ev_is("advert", mac, delivered=True, created=True), what=f"advert {mac}")

    # optional property missing -> InvalidArgs (bluer then reports None)
    r = await c.call("org.bluez", pl, PROPS, "Get", "ss", [DEV_IFACE, "TxPower"])
    assert r.error_name == "org.freedesktop.DBus.Error.InvalidArgs", r.error_name
    assert (await c.get(pl, DEV_IFACE, "RSSI")) == Variant("n", -60)

    # --- advertisement updates ---
    peer.send(op="advert", mac=PADLOCK, rssi=-48, manufacturer={"0xffff": "01020a"}, id=1)
    ev = await peer.wait(ev_is("advert", PADLOCK, id=1), what="advert op")
    assert ev["delivered"] and ev["changed"] == ["ManufacturerData", "RSSI"], ev
    m = await c.sig(props_changed(pl, DEV_IFACE, "RSSI", -48), what="RSSI -48")
    assert m.body[1]["ManufacturerData"].value == {
        0xFFFF: Variant("ay", bytes.fromhex("01020a"))
    }, m.body
    peer.send(op="advert", mac=PADLOCK, rssi=-47)  # unchanged data: only RSSI
    m = await c.sig(props_changed(pl, DEV_IFACE, "RSSI", -47), what="RSSI -47")
    assert set(m.body[1]) == {"RSSI"}, m.body
    peer.send(op="sensor", mac=SENSOR, hex="4000020164023c09")
    m = await c.sig(props_changed(sn, DEV_IFACE, "ServiceData"), what="sensor data")
    assert m.body[1]["ServiceData"].value == {
        BTHOME: Variant("ay", bytes.fromhex("4000020164023c09"))
    }, m.body
    await peer.wait(ev_is("advert", SENSOR, delivered=True), what="sensor advert")

    # --- connect: Connected, GATT objects, ServicesResolved, then the reply ---
    c.drain()
    await c.bz(pl, DEV_IFACE, "Connect")
    got = [
        (m.member, m.path, m.body[0] if m.member == "InterfacesAdded" else sorted(m.body[1]))
        for m in c.signals
    ]
    assert got[0] == ("PropertiesChanged", pl, ["Connected"]), got
    assert got[-1] == ("PropertiesChanged", pl, ["ServicesResolved"]), got
    assert sum(1 for g in got if g[0] == "InterfacesAdded") == 5, got
    conn = await peer.wait(ev_is("connected", PADLOCK), what="connected")
    objs = await c.objects()
    svc = [
        p
        for p, i in objs.items()
        if p.startswith(pl + "/")
        and i.get("org.bluez.GattService1", {}).get("UUID") == Variant("s", NOKE_SERVICE)
    ]
    assert len(svc) == 1, objs.keys()
    chars = {
        i[CHRC_IFACE]["UUID"].value: (p, i[CHRC_IFACE])
        for p, i in objs.items()
        if p.startswith(svc[0] + "/") and CHRC_IFACE in i
    }
    assert set(chars) == {NOKE_TX, NOKE_RX, NOKE_SESSION}, chars.keys()
    tx, txp = chars[NOKE_TX]
    rx, rxp = chars[NOKE_RX]
    ses, sesp = chars[NOKE_SESSION]
    assert txp["Flags"] == Variant("as", ["write-without-response", "write"]), txp
    assert rxp["Flags"] == Variant("as", ["notify"]) and rxp["Notifying"] == Variant(
        "b", False
    ), rxp
    assert sesp["Flags"] == Variant("as", ["read"]) and sesp["MTU"].signature == "q", sesp
    assert sesp["Value"] == Variant("ay", b""), sesp
    for p in (txp, rxp):
        assert "NotifyAcquired" not in p and "WriteAcquired" not in p, p
    assert (await c.get(pl, DEV_IFACE, "ServicesResolved")) == Variant("b", True)
    uuids = (await c.get(pl, DEV_IFACE, "UUIDs")).value
    assert NOKE_SERVICE in uuids, uuids
    await c.bz(pl, DEV_IFACE, "Connect")  # already connected: success

    # --- session read ---
    (session,) = await c.bz(ses, CHRC_IFACE, "ReadValue", "a{sv}", [{}])
    assert isinstance(session, bytes) and len(session) == 20, session
    assert struct.unpack("<H", session[2:4])[0] == 2950, session.hex()
    assert conn["session"] == session.hex(), (conn, session.hex())
    ev = await peer.wait(ev_is("read", PADLOCK, char="0004"), what="read")
    assert ev["hex"] == session.hex(), ev
    await c.sig(props_changed(ses, CHRC_IFACE, "Value", session), what="session Value")
    (part,) = await c.bz(ses, CHRC_IFACE, "ReadValue", "a{sv}", [{"offset": Variant("q", 18)}])
    assert part == session[18:], part

    # --- write without a notify session: the unlock happens, the notification is not sent ---
    now = int(time.time())
    await c.bz(
        tx,
        CHRC_IFACE,
        "WriteValue",
        "aya{sv}",
        [offline_packet(OFFLINE_KEY, UNLOCK_CMD, session, now), {"type": Variant("s", "command")}],
    )
    ev = await peer.wait(ev_is("notify", PADLOCK), what="notify undelivered")
    assert ev["delivered"] is False and ev["hex"].startswith("5160"), ev
    await peer.wait(ev_is("unlocked", PADLOCK, via="offline"), what="unlocked 1")

    # --- StartNotify + offline unlock ---
    await c.bz(rx, CHRC_IFACE, "StartNotify")
    await c.sig(props_changed(rx, CHRC_IFACE, "Notifying", True), what="Notifying")
    name, _ = await c.bz_err(rx, CHRC_IFACE, "StartNotify")
    assert name == "org.bluez.Error.InProgress", name
    (cccd,) = await c.bz(rx + "/desc000f", "org.bluez.GattDescriptor1", "ReadValue", "a{sv}", [{}])
    assert cccd == b"\x01\x00", cccd
    pkt = offline_packet(OFFLINE_KEY, UNLOCK_CMD, session, now)
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [pkt, {"type": Variant("s", "command")}])
    ev = await peer.wait(ev_is("write", PADLOCK, char="0002"), what="write")
    assert ev["hex"] == pkt.hex() and ev["type"] == "command", ev
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="success notification")
    assert m.body[1]["Value"].signature == "ay", m.body
    assert m.body[1]["Value"].value == bytes([0x51, 0x60, 0x30]) + bytes(17), m.body[1][
        "Value"
    ].value.hex()
    ev = await peer.wait(ev_is("unlocked", PADLOCK, via="offline"), what="unlocked")
    assert ev["time"] == now and abs(ev["skew"]) < 5, ev

    # wrong key, stale time -> 51 61
    bad = offline_packet(bytes(16), UNLOCK_CMD, session, now)
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [bad, {}])
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="invalid key notification")
    assert m.body[1]["Value"].value[:2] == b"\x51\x61", m.body
    ev = await peer.wait(ev_is("invalid_packet", PADLOCK), what="invalid_packet")
    assert ev["reason"] in ("checksum", "time") and ev["hex"] == bad.hex(), ev
    stale = offline_packet(OFFLINE_KEY, UNLOCK_CMD, session, now - 1000)
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [stale, {"type": Variant("s", "request")}])
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="stale notification")
    assert m.body[1]["Value"].value[:2] == b"\x51\x61", m.body
    ev = await peer.wait(ev_is("invalid_packet", PADLOCK, reason="time"), what="stale")
    assert ev["time"] == now - 1000, ev
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [b"\x01\x02", {}])
    await peer.wait(ev_is("invalid_packet", PADLOCK, reason="length"), what="short packet")
    await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="short packet notification")

    # this padlock's own clock two hours behind: a packet made now is refused for its time
    peer.send(op="config", mac=PADLOCK, clock_offset_s=-7200)
    late = offline_packet(OFFLINE_KEY, UNLOCK_CMD, session, int(time.time()))
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [late, {}])
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="clock-off notification")
    assert m.body[1]["Value"].value[:2] == b"\x51\x61", m.body
    ev = await peer.wait(ev_is("invalid_packet", PADLOCK, hex=late.hex()), what="clock off")
    assert ev["reason"] == "time" and ev["skew"] > 7000, ev
    peer.send(op="config", mac=PADLOCK, clock_offset_s=0)
    # a packet on its refuse list: 51 61, even one that would open it
    good = offline_packet(OFFLINE_KEY, UNLOCK_CMD, session, int(time.time()))
    peer.send(op="config", mac=PADLOCK, refuse_packets=[good.hex()])
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [good, {}])
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="refused notification")
    assert m.body[1]["Value"].value[:2] == b"\x51\x61", m.body
    await peer.wait(ev_is("invalid_packet", PADLOCK, reason="refused"), what="refused")
    peer.send(op="config", mac=PADLOCK, refuse_packets=[])

    # the PROTOCOLS.md test vector, with the lock's session and clock set to it
    peer.send(op="config", mac=PADLOCK, session=VEC_SESSION.hex())
    peer.send(op="clock", unix=1700000000)
    await peer.wait(ev_is("ack", None, op="clock"), what="clock")
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [VEC_PACKET, {}])
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="vector notification")
    assert m.body[1]["Value"].value[:3] == b"\x51\x60\x30", m.body
    ev = await peer.wait(ev_is("unlocked", PADLOCK, via="offline"), what="vector unlocked")
    assert ev["time"] == 1700000000, ev
    peer.send(op="clock", real=True)
    peer.send(op="config", mac=PADLOCK, session=None)

    # --- online packets, in order, then the server packet ---
    p1 = bytes.fromhex("7E100231") + bytes(range(16))
    p2 = bytes.fromhex("7E100232") + bytes(range(16, 32))
    server = "50" + "ab" * 19
    peer.send(
        op="accept_packets",
        mac=PADLOCK,
        packets=[p1.hex(), p2.hex()],
        server_packet=server,
        id="acc",
    )
    ev = await peer.wait(ev_is("ack", PADLOCK, op="accept_packets", id="acc"), what="accept ack")
    assert ev["count"] == 2, ev
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [p2, {}])
    await peer.wait(ev_is("invalid_packet", PADLOCK, reason="out_of_order"), what="out of order")
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="out of order notification")
    assert m.body[1]["Value"].value[:2] == b"\x51\x61", m.body
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [p1, {}])
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="p1 success")
    assert m.body[1]["Value"].value[:3] == b"\x51\x60\x31", m.body
    await peer.wait(ev_is("accepted", PADLOCK, index=0, remaining=1), what="accepted p1")
    await c.bz(tx, CHRC_IFACE, "WriteValue", "aya{sv}", [p2, {}])
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="p2 success")
    assert m.body[1]["Value"].value[:3] == b"\x51\x60\x32", m.body
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="server packet")
    assert m.body[1]["Value"].value == bytes.fromhex(server), m.body
    await peer.wait(ev_is("unlocked", PADLOCK, via="online"), what="online unlocked")

    # --- what the mock refuses ---
    name, msg = await c.bz_err(rx, CHRC_IFACE, "AcquireNotify", "a{sv}", [{}])
    assert name == "org.bluez.Error.NotSupported", name
    await peer.wait(ev_is("error", PADLOCK), what="AcquireNotify error event")
    name, _ = await c.bz_err(tx, CHRC_IFACE, "AcquireWrite", "a{sv}", [{}])
    assert name == "org.bluez.Error.NotSupported", name
    await peer.wait(ev_is("error", PADLOCK), what="AcquireWrite error event")
    name, _ = await c.bz_err(
        ses, CHRC_IFACE, "WriteValue", "aya{sv}", [b"\x00", {"type": Variant("s", "request")}]
    )
    assert name == "org.bluez.Error.NotPermitted", name
    name, _ = await c.bz_err(tx, CHRC_IFACE, "ReadValue", "a{sv}", [{}])
    assert name == "org.bluez.Error.NotPermitted", name
    name, _ = await c.bz_err(pl, DEV_IFACE, "Pair")
    assert name == "org.bluez.Error.NotSupported", name

    # --- device-side disconnect; it advertises again; reconnect uses the cached GATT ---
    c.drain()
    peer.send(op="disconnect", mac=PADLOCK)
    await c.sig(props_changed(rx, CHRC_IFACE, "Notifying", False), what="Notifying false")
    m = await c.sig(props_changed(pl, DEV_IFACE, "Connected", False), what="Connected false")
    assert m.body[1]["ServicesResolved"].value is False, m.body
    await peer.wait(ev_is("disconnected", PADLOCK, by="device"), what="disconnected")
    await c.sig(props_changed(pl, DEV_IFACE, "RSSI"), what="advert after disconnect")
    name, msg = await c.bz_err(ses, CHRC_IFACE, "ReadValue", "a{sv}", [{}])
    assert name == "org.bluez.Error.Failed" and msg == "Not connected", (name, msg)
    name, _ = await c.bz_err(rx, CHRC_IFACE, "StartNotify")
    assert name == "org.bluez.Error.Failed", name
    c.drain()
    await c.bz(pl, DEV_IFACE, "Connect")
    assert not any(m.member == "InterfacesAdded" for m in c.signals), "GATT must stay cached"
    (session2,) = await c.bz(ses, CHRC_IFACE, "ReadValue", "a{sv}", [{}])
    assert session2 != session and session2[2:4] == session[2:4], (session.hex(), session2.hex())

    # --- sleep while connected: shutdown notification, then the link drops ---
    await c.bz(rx, CHRC_IFACE, "StartNotify")
    c.drain()
    peer.send(op="sleep", mac=PADLOCK)
    m = await c.sig(props_changed(rx, CHRC_IFACE, "Value"), what="shutdown notification")
    assert m.body[1]["Value"].value[:4] == bytes([0x51, 0x64, 1, 1]), m.body
    await c.sig(props_changed(pl, DEV_IFACE, "Connected", False), what="Connected false (sleep)")
    await peer.wait(ev_is("disconnected", PADLOCK, by="sleep"), what="disconnected by sleep")
    peer.send(op="advert", mac=PADLOCK, rssi=-40, id="asleep")
    ev = await peer.wait(ev_is("advert", PADLOCK, id="asleep"), what="advert while asleep")
    assert ev["delivered"] is False, ev

    # --- Connect to the sleeping padlock fails like an out-of-range LE device ---
    t0 = time.monotonic()
    name, msg = await c.bz_err(pl, DEV_IFACE, "Connect")
    took = time.monotonic() - t0
    assert name == "org.bluez.Error.Failed" and msg == "le-connection-abort-by-local", (name, msg)
    assert 0.3 < took < 2.0, took
    await peer.wait(ev_is("connect_failed", PADLOCK), what="connect_failed")
    assert (await c.get(pl, DEV_IFACE, "Connected")) == Variant("b", False)

    # --- a wake during Connect completes it (wake-to-answer) ---
    async def wake_later():
        await asyncio.sleep(0.15)
        peer.send(op="wake", mac=PADLOCK)

    task = asyncio.create_task(wake_later())
    await c.bz(pl, DEV_IFACE, "Connect")
    await task
    await peer.wait(ev_is("connected", PADLOCK), what="connected after wake")
    c.drain()
    await c.bz(pl, DEV_IFACE, "Disconnect")
    await c.sig(props_changed(pl, DEV_IFACE, "Connected", False), what="client disconnect")
    await peer.wait(ev_is("disconnected", PADLOCK, by="client"), what="disconnected by client")
    await c.sig(props_changed(pl, DEV_IFACE, "RSSI", -40), what="advert after client disconnect")

    # sensors and fobs are not connectable
    name, msg = await c.bz_err(fb, DEV_IFACE, "Connect")
    assert name == "org.bluez.Error.Failed", name

    # --- StopDiscovery invalidates RSSI; remove; rediscover ---
    c.drain()
    await c.bz(ADAPTER, "org.bluez.Adapter1", "StopDiscovery")
    await c.sig(
        props_changed(ADAPTER, "org.bluez.Adapter1", "Discovering", False), what="Discovering false"
    )
    m = await c.sig(props_changed(pl, DEV_IFACE, "RSSI"), what="RSSI invalidated")
    assert m.body[2] == ["RSSI"], m.body
    await peer.wait(ev_is("discovery", state="stopped"), what="discovery stopped")
    r = await c.call("org.bluez", pl, PROPS, "Get", "ss", [DEV_IFACE, "RSSI"])
    assert r.error_name == "org.freedesktop.DBus.Error.InvalidArgs", r.error_name
    name, msg = await c.bz_err(ADAPTER, "org.bluez.Adapter1", "StopDiscovery")
    assert name == "org.bluez.Error.Failed", name
    peer.send(op="remove", mac=PADLOCK)
    await c.sig(removed(rx + "/desc000f"), what="desc removed")
    await c.sig(removed(pl), what="padlock removed")
    objs = await c.objects()
    assert not any(p.startswith(pl) for p in objs), objs.keys()
    await c.bz(ADAPTER, "org.bluez.Adapter1", "StartDiscovery")
    m = await c.sig(added(pl), what="padlock rediscovered")
    assert m.body[1][DEV_IFACE]["RSSI"].value == -40, m.body

    # --- a second client's discovery session ends when it leaves the bus ---
    c2 = await Client(address).start()
    await c2.bz(ADAPTER, "org.bluez.Adapter1", "StartDiscovery")
    peer.send(op="state")
    st = await peer.wait(ev_is("state"), what="state 2 clients")
    assert len(st["discovery_clients"]) == 2, st
    c2.bus.disconnect()
    await asyncio.sleep(0.3)
    peer.send(op="state")
    st = await peer.wait(ev_is("state"), what="state 1 client")
    assert len(st["discovery_clients"]) == 1 and st["discovering"], st
    by = {d["mac"]: d for d in st["devices"]}
    assert by[PADLOCK]["awake"] and not by[PADLOCK]["connected"] and by[SENSOR]["exported"], st
    await c.bz(ADAPTER, "org.bluez.Adapter1", "StopDiscovery")
    await peer.wait(ev_is("discovery", state="stopped"), what="stopped at last")

    # --- bad input keeps the peer alive ---
    peer.raw(b"not json\n")
    peer.send(op="bogus")
    peer.send(op="sleep", mac="00:00:00:00:00:00")
    peer.send(op="sleep", mac=SENSOR)
    for _ in range(4):
        await peer.wait(ev_is("error"), what="error")

    c.bus.disconnect()
    sock = address.split("unix:path=", 1)[1].split(",", 1)[0]
    assert os.path.exists(sock), sock
    peer.send(op="quit")
    assert await asyncio.to_thread(peer.p.wait, 5) == 0
    assert not os.path.exists(sock), "bus socket left behind"

    # --- second instance: periodic adverts, SIGTERM ---
    peer = Peer(["--sensor", SENSOR, "--adv-interval-ms", "100"])
    address = (await peer.wait(ev_is("ready"), what="ready 2"))["address"]
    c = await Client(address).start()
    await c.bz(ADAPTER, "org.bluez.Adapter1", "StartDiscovery")
    await c.sig(added(dev_path(SENSOR)), what="sensor added 2")
    for i in range(3):
        m = await c.sig(
            props_changed(dev_path(SENSOR), DEV_IFACE, "RSSI"), timeout=1.0, what=f"periodic {i}"
        )
        assert set(m.body[1]) == {"RSSI"}, m.body

    # --- restart: bluetoothd goes (objects removed, org.bluez unowned) and comes back ---
    owners = []

    def on_owner(msg):
        if msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == "org.bluez":
            owners.append((msg.body[1], msg.body[2]))
        return None

    c.bus.add_message_handler(on_owner)
    await c.ok(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "AddMatch",
        "s",
        ["type='signal',member='NameOwnerChanged',arg0='org.bluez'"],
    )
    (owner1,) = await c.ok(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "GetNameOwner", "s", ["org.bluez"],
    )
    c.drain()
    peer.send(op="restart", down_ms=300, id=7)
    down = await peer.wait(ev_is("restarted", phase="down"), what="restarted down")
    assert down.get("id") == 7, down
    await c.sig(props_changed(ADAPTER, "org.bluez.Adapter1", "Discovering", False), what="off")
    await c.sig(removed(dev_path(SENSOR)), what="sensor removed by restart")
    m = await c.sig(removed(ADAPTER), what="adapter removed by restart")
    assert "org.bluez.Adapter1" in m.body[1], m.body
    await c.sig(removed("/org/bluez"), what="/org/bluez removed by restart")
    r = await c.call(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "GetNameOwner", "s", ["org.bluez"],
    )
    assert r.error_name == "org.freedesktop.DBus.Error.NameHasNoOwner", r.error_name
    peer.send(op="power", on=False)
    await peer.wait(ev_is("error", op="power"), what="power refused while down")
    await peer.wait(ev_is("restarted", phase="up"), what="restarted up")
    (owner2,) = await c.ok(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "GetNameOwner", "s", ["org.bluez"],
    )
    assert owner2 != owner1, (owner1, owner2)
    assert owners == [(owner1, ""), ("", owner2)], owners
    objs = await c.objects()
    ad = objs[ADAPTER]["org.bluez.Adapter1"]
    assert ad["Powered"] == Variant("b", True) and ad["Discovering"] == Variant("b", False), ad
    assert "org.bluez.AgentManager1" in objs["/org/bluez"], objs.keys()
    assert not any("/dev_" in p for p in objs), objs.keys()
    await c.bz(ADAPTER, "org.bluez.Adapter1", "StartDiscovery")
    await c.sig(added(dev_path(SENSOR)), what="sensor added after restart")

    c.bus.disconnect()
    sock = address.split("unix:path=", 1)[1].split(",", 1)[0]
    peer.p.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(peer.p.wait, 5) == 0
    assert not os.path.exists(sock), "bus socket left behind after SIGTERM"


def main():
    asyncio.run(scenario())
    print("selftest_bluez: PASS")


if __name__ == "__main__":
    main()
