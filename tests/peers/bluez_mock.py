#!/usr/bin/env python3
"""bluez_mock.py - a mock BlueZ (bluetoothd) on a private D-Bus system bus (test peer).

Part of gatehouse's integration tests. Needs Python 3.11 and, from tests/requirements.txt,
`python-dbusmock==0.38.1`, `dbus-python==1.5.1` (built from source: needs Debian's
libdbus-1-dev, libglib2.0-dev, pkg-config and a C compiler) and `pycryptodome==3.23.0`
(import `Crypto`). Also Debian's `dbus-daemon` binary. No Bluetooth hardware, no /dev/vhci.

WHAT IT DOES
  Starts its own dbus-daemon (a system-type bus with an allow-all policy, listening on
  unix:path=<tmpdir>/system_bus_socket), takes the name org.bluez on it and serves
  python-dbusmock's `bluez5` template (ObjectManager at /, AgentManager1 and ProfileManager1 at
  /org/bluez, adapter hci0 at /org/bluez/hci0 with LEAdvertisingManager1 and
  AdvertisementMonitorManager1) plus everything the template lacks for a BLE central:
  discovery with per-client sessions, simulated devices that advertise, connect, resolve GATT
  services and answer GATT reads/writes/notifications. Point the daemon under test at the bus
  with DBUS_SYSTEM_BUS_ADDRESS=<"address" of the ready event>; bluer (libdbus) honours it.
  The peer runs one GLib main loop (driven through ctypes, as dbusmock's own runner does);
  stdin is read by a thread and every op is handled on the main loop, so D-Bus replies,
  signals and stdout events are strictly ordered: an event is written after the D-Bus
  signal(s) it reports were sent.

  Changes to the bluez5 template / to dbusmock, all in this process:
  - Properties.Get of a property an object lacks answers org.freedesktop.DBus.Error.InvalidArgs
    ("No such property"), as bluetoothd does (dbusmock says <iface>.UnknownProperty; bluer maps
    only InvalidArgs to "property absent", e.g. Device1.RSSI of a device out of range).
  - Adapter1.StartDiscovery/StopDiscovery/SetDiscoveryFilter/RemoveDevice are replaced: per
    D-Bus client (unique name) like bluetoothd: StartDiscovery twice from one client ->
    org.bluez.Error.InProgress; StopDiscovery without a session -> org.bluez.Error.Failed
    "No discovery started"; Discovering is true while any client has a session; a client that
    leaves the bus loses its session. The filter is recorded (event) but not applied.
    Adapter1.GetDiscoveryFilters is added. The template's AddDevice is not used: its
    ManufacturerData/ServiceData have the wrong D-Bus type (aa{qv}).

DEVICES (D-Bus path /org/bluez/hci0/dev_AA_BB_CC_DD_EE_FF)
  A device object appears (ObjectManager.InterfacesAdded, all Device1 properties) the first
  time one of its advertisements is received while discovery is on, and then stays (as a
  bluetoothd device does; TemporaryTimeout is not simulated: use the "remove" op). An
  advertisement is received only while Discovering is true, the device is awake and not
  connected. Each received advertisement emits Device1 PropertiesChanged with RSSI (always),
  plus ManufacturerData / ServiceData / Name+Alias when they changed (all data when some
  client's filter has DuplicateData=true, or the op says "force"). Real bluetoothd also
  suppresses unchanged RSSI; here every advertisement carries RSSI so a test sees it.
  Discovery start: every awake, unconnected device advertises after --discover-delay-ms.
  Discovery stop (last session): RSSI is invalidated (PropertiesChanged invalidated ["RSSI"],
  the property is then absent) on every unconnected device, as bluetoothd does.
  With --adv-interval-ms N > 0, awake unconnected devices advertise every N ms while
  discovering (no stdout event for these periodic ones).
  Device1 properties: Address, AddressType, Name, Alias, Paired, Trusted, Blocked,
  LegacyPairing, Connected, ServicesResolved, UUIDs, Adapter, AdvertisingFlags ([0x06]),
  RSSI (while seen), ManufacturerData a{qv} (value variant "ay"; the 2-byte company id is the
  key, as bluetoothd strips it) and ServiceData a{sv} (value "ay"), each only when non-empty.
  Device1.Connect (async, like bluetoothd's LE connect):
    padlock, awake: after --connect-ms: PropertiesChanged Connected=true; on the first
      connection the GATT objects appear (InterfacesAdded: service, 3 characteristics, CCCD
      descriptor) and UUIDs changes; after --resolve-ms more: ServicesResolved=true, then the
      Connect call returns. GATT objects stay after a disconnect (bluetoothd's cache).
    padlock asleep (or any sensor/fob: non-connectable): the attempt waits; a padlock that
      wakes within --connect-timeout-ms is connected as above (wake-to-answer), otherwise
      Connect fails with org.bluez.Error.Failed "le-connection-abort-by-local" (what BlueZ
      >= 5.62 answers when an LE device does not answer; bluer: ErrorKind::Failed).
    already connected -> success at once; an attempt in progress -> org.bluez.Error.InProgress.
  Device1.Disconnect: ends a pending attempt (it fails "le-connection-abort-by-local") or the
    connection; always succeeds. Disconnect = one PropertiesChanged {Connected: false,
    ServicesResolved: false} (after Notifying=false on a subscribed characteristic).
  Device1.Pair/ConnectProfile/DisconnectProfile -> org.bluez.Error.NotSupported.

PADLOCK GATT (legacy protocol; MTU property 23)
  .../serviceXXXX   GattService1 UUID 1bc50001-0200-d29e-e511-446c609db825, Primary, Includes []
  .../char000b  "0002" UUID 1bc50002-...  Flags ["write-without-response","write"]  (commands)
  .../char000d  "0003" UUID 1bc50003-...  Flags ["notify"], Notifying     (lock -> client)
  .../char000d/desc000f  GattDescriptor1 0x2902 (CCCD): ReadValue gives [1,0] / [0,0];
                         WriteValue -> org.bluez.Error.NotPermitted (use StartNotify)
  .../char0010  "0004" UUID 1bc50004-...  Flags ["read"]   session, 20 bytes: bytes 2-3 =
                battery mV little-endian, the rest random, new on every connection.
  GattCharacteristic1 methods: ReadValue(a{sv} "offset") -> ay; WriteValue(ay, a{sv} "type":
  "command"|"request"|"reliable", "offset"); StartNotify; StopNotify. All need a connection
  (else org.bluez.Error.Failed "Not connected"); reading a char without "read" / writing one
  without the matching write flag -> org.bluez.Error.NotPermitted / NotSupported.
  A successful ReadValue also updates Value (PropertiesChanged), as bluetoothd does.
  Notifications: PropertiesChanged {Value: ay} on char000d, only while at least one client has
  called StartNotify (per client: a second StartNotify -> InProgress; StopNotify without one ->
  Failed); Notifying follows. This is exactly what bluer's Characteristic::notify() consumes.
  AcquireNotify / AcquireWrite exist but answer org.bluez.Error.NotSupported (and an "error"
  event), and NotifyAcquired/WriteAcquired are not exported: bluer only uses the fd-based path
  when the application calls notify_io()/write_io(); notify()/write() use StartNotify+
  PropertiesChanged and WriteValue.
  A write to 0002 is judged --notify-delay-ms later, in this order:
   1. online: the next packet of the "accept_packets" list (exact 20 bytes, in order) ->
      notification 51 60 <cmd id> 00.. (20 bytes), event "accepted"; after the last one the
      optional server packet is notified and, unless "unlock":false, event "unlocked"
      via "online". A later packet of the list written out of order is invalid.
   2. offline: with an offline key: K[i] = (offline_key[i] + session[i]) mod 256;
      P = AES-128 forward cipher (encrypt) of bytes 4..20 under K; valid when
      P[15] == sum(P[0..15]) mod 256 and |uint32 LE P[2..6] - lock clock| <= --time-window-s
      (the lock clock: the "clock" op's, plus the padlock's own "clock_offset_s")
      -> notification 51 60 <cmd id> 00.., event "unlocked" via "offline".
   0. a packet of the "refuse_packets" list (config op) -> notification 51 61 00.. (invalid
      key), event "invalid_packet" reason "refused" (the cloud's packets, refused by the lock).
   3. anything else -> notification 51 61 00.. (invalid key), event "invalid_packet".
   <cmd id> = byte 3 of the written packet (the last clear header byte) unless the
   accept_packets op gave "cmd_id".

COMMAND LINE
  bluez_mock.py [--padlock SPEC]... [--sensor SPEC]... [--fob SPEC]... [options]
    --padlock MAC[:NAME[:OFFLINEKEY]][:k=v]...
        NAME default NOKE3P_<MAC hex, no colons>; OFFLINEKEY 32 hex chars (empty = none: every
        offline packet is invalid). k=v: company=0xFFFF (manufacturer id, default 0xFFFF),
        mfg=00020a (manufacturer data after the id: [flags, fw major, fw minor]; default
        00020a), battery=3000 (mV, session bytes 2-3), rssi=-60, type=public|random.
    --sensor MAC[:NAME][:k=v]...   BTHome v2 sensor, non-connectable. NAME default
        BTH_<last 2 octets hex>. k=v: data=<service data hex for 0000fcd2-...> (default
        4000010164026608: packet id 1, battery 100 %, 21.50 degC), rssi=-70, type=...
    --fob MAC[:NAME][:k=v]...      advertising only, non-connectable. NAME default
        FOB1F_<MAC hex>. k=v: company=, mfg= (default none), rssi=-65, type=...
    (MAC = AA:BB:CC:DD:EE:FF, any case; reported upper-case. Positional fields may be empty.)
        bindkey=<32 hex>: an encrypted sensor (AES-CCM under this key, counter= first
        counter, default 1; objects=<hex> the first advert's plain objects, default 0164026608).
    --bus-dir DIR: the bus socket is DIR/system_bus_socket (the address is known before the
        mock starts: a test process can be started with DBUS_SYSTEM_BUS_ADDRESS set to it)
    --connect-ms 30  --resolve-ms 20  --connect-timeout-ms 1000  --discover-delay-ms 50
    --notify-delay-ms 10  --adv-interval-ms 0  --time-window-s 300  --mtu 23 (the MTU property;
    bluer's mtu() reports it minus 5)  --verbose (dbusmock's per-call log and the dbus-daemon's
    output to stderr)
  Exit status 0 after "quit", stdin EOF, SIGTERM or SIGINT (the dbus-daemon is killed and the
  temp dir removed; the daemon also gets SIGTERM by PR_SET_PDEATHSIG if this process dies);
  2 on bad arguments; 1 if the bus cannot be started or dies. Diagnostics go to stderr.

STDIN: one JSON object per line, handled in order. Every op may carry "id" (echoed in its
  "ack"/"error"). "mac" names a device (any case).
  {"op":"advert","mac":M[,"rssi":-55][,"manufacturer":{"0xffff":"00020a"}|null]
        [,"service_data":{"fcd2"|"<uuid>":"hex"}|null][,"name":"..."][,"force":true]}
      update the advertising data (given fields replace; null clears) and receive one
      advertisement (see DEVICES) -> event "advert".
  {"op":"sensor","mac":M,"hex":"40..."}   = advert with service_data {0000fcd2-...: hex}.
  {"op":"sensor","mac":M,"objects":"hex"}   = the same with BTHome v2 data made from these
      plain objects: encrypted under the sensor's bindkey (next counter) when it has one.
  {"op":"add","kind":"padlock"|"sensor"|"fob","spec":"MAC[:...]"}   a device appears (the
      --padlock/--sensor/--fob SPEC forms) and advertises at once -> event "added" (with the
      "advert" fields). An unknown device for install mode.
  {"op":"sleep","mac":M[,"shutdown":true,"lock_state":1,"timeout_flag":1]}
      padlock stops advertising and is not connectable. If connected: notification
      51 64 <lock_state> <timeout_flag> 00.. (when "shutdown", default true), then the
      connection drops (event "disconnected" by "sleep").
  {"op":"wake","mac":M}   advertises again (an advertisement at once if discovering) and
      completes a pending Connect.
  {"op":"accept_packets","mac":M,"packets":["hex40",...][,"server_packet":"50..."]
        [,"unlock":true][,"cmd_id":n]}   replaces the padlock's online list ([] clears).
  {"op":"notify","mac":M,"hex":"..."}   the padlock sends this notification now.
  {"op":"disconnect","mac":M}   the device drops the connection (event "disconnected" by
      "device"); no-op if not connected.
  {"op":"config","mac":M[,"battery_mv":n][,"offline_key":"hex"|null][,"session":"hex40"|null]
        [,"connectable":bool][,"rssi":n][,"clock_offset_s":n]
        [,"falls_asleep":{"shutdown":true,"ms":0}|null][,"refuse_packets":["hex40",...]]}
      "session" fixes the session of the current and later connections (null = random again).
      "clock_offset_s": this padlock's clock runs that far from the others (a battery change
      reset it). "falls_asleep": on the next connection, "ms" after notifications are started
      (0: at once, before the StartNotify reply is sent), the padlock goes to sleep before
      anything is written (its idle timeout): notification
      51 64 01 00 unless "shutdown" is false, event "fell_asleep", then the link drops (event
      "disconnected" by "sleep"); once. "refuse_packets": packets it answers 51 61 (see the
      write rules, 0.).
  {"op":"clock","unix":N} | {"op":"clock","offset":S} | {"op":"clock","real":true}
      the padlocks' clock for the offline time check (it keeps running from N).
  {"op":"power","on":false|true}   the adapter is powered off (connections dropped, every
      discovery session ended: Discovering=false; StartDiscovery then fails
      org.bluez.Error.NotReady) / on again (Powered changes; clients must start discovery
      again), as after `bluetoothctl power off|on` or an adapter reset.
  {"op":"restart"[,"down_ms":300]}   bluetoothd restarts (`systemctl restart bluetooth`, a
      crash): every connection drops (event "disconnected" by "restart"; a pending Connect
      fails org.bluez.Error.Failed), every discovery session ends (Discovering=false, event
      "discovery" "stopped" with sender "restart"), filters and notify sessions are forgotten;
      then InterfacesRemoved for every GATT object, device, the adapter and /org/bluez, and the
      mock's bus connection closes: org.bluez (and its unique name) lose their owner
      (NameOwnerChanged) and "/" with its ObjectManager is gone -> event "restarted"
      phase "down". down_ms later a new connection (new unique name) takes org.bluez and
      exports the template's objects and hci0 again (powered, not discovering, no device
      objects, as bluetoothd's start) -> event "restarted" phase "up". The simulated devices
      keep their state (awake, data, keys); device objects reappear with their next received
      advertisement (once some client starts discovery), GATT objects on the next connection.
      While down, "power" and "restart" answer "error"; other ops act on the devices only.
  {"op":"remove","mac":M}   the device object (and its GATT objects) disappear
      (InterfacesRemoved), as after bluetoothd's TemporaryTimeout; it reappears with its
      next received advertisement.
  {"op":"state"}   -> "state" event.      {"op":"quit"}   -> exit 0.
  A bad line / unknown op / unknown device / bad field -> "error" event; the peer goes on.

STDOUT: one JSON object per line, written and flushed at once; each has "ev", "t"
  (time.monotonic() of this process = CLOCK_MONOTONIC, comparable with Rust's Instant on
  Linux) and "mac" (the device, or null).
  {"ev":"ready","mac":null,"address":"unix:path=...,guid=...","adapter":"/org/bluez/hci0",
        "devices":[{"mac","kind","name","path"},...]}
  {"ev":"discovery","mac":null,"state":"started"|"stopped","sender":":1.n"}   (Discovering
        changed; "stopped" also when the last client left the bus)
  {"ev":"discovery_filter","mac":null,"sender":..,"filter":{...}}
  {"ev":"advert","mac":M,"delivered":bool,"created":bool,"changed":["RSSI",...]}
        (an advert op, a wake, discovery start, or the end of a connection; "delivered" =
        received by the adapter, "created" = the device object was added with it)
  {"ev":"connecting","mac":M,"sender":..}      a Connect call started waiting
  {"ev":"connected","mac":M,"sender":..,"session":"hex"|null}   (after ServicesResolved)
  {"ev":"connect_failed","mac":M,"error":"org.bluez.Error.Failed","message":"..."}
  {"ev":"disconnected","mac":M,"by":"client"|"device"|"sleep"|"remove"|"power"|"restart"}
  {"ev":"read","mac":M,"char":"0004","hex":<whole value>,"offset":n}
  {"ev":"write","mac":M,"char":"0002","hex":...,"type":"command"|"request"}  (bluer's write()
        sends "command", i.e. write without response)
  {"ev":"notify_state","mac":M,"char":"0003","on":bool,"sender":..}
  {"ev":"notify","mac":M,"char":"0003","hex":...,"delivered":bool} (delivered = some client
        had StartNotify on; otherwise the lock does not send it)
  {"ev":"accepted","mac":M,"hex":...,"index":i,"remaining":n}
  {"ev":"unlocked","mac":M,"via":"offline"|"online"[,"time":unix,"skew":s]}
  {"ev":"fell_asleep","mac":M,"shutdown":bool}   (the falls_asleep config)
  {"ev":"invalid_packet","mac":M,"hex":...,"reason":"length"|"refused"|"no_key"|"checksum"|"time"|
        "out_of_order"}
  {"ev":"ack","mac":M|null,"op":..[,"id":..][, op-specific fields]}   for every op that has no
        other answer (advert/sensor answer with "advert", state with "state").
  {"ev":"restarted","mac":null,"phase":"down"|"up"[,"down_ms":n]}   (the restart op)
  {"ev":"state","mac":null,"bluetoothd":"up"|"down","discovering":bool,"discovery_clients":[..],"clock_offset":s,
        "devices":[{"mac","kind","name","path","exported","awake","connected","connecting",
        "notifying","rssi","manufacturer":{id:hex},"service_data":{uuid:hex},
        "accept_pending":n},...]}
  {"ev":"error","mac":M|null,"msg":"text"[,"op":..][,"id":..]}   (also for an
        AcquireNotify/AcquireWrite call and for internal errors)
"""

import argparse
import ctypes
import heapq
import itertools
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

# ---------------------------------------------------------------------------------------------
# Output: JSON lines on the original stdout; fd 1 is pointed at stderr so that nothing else
# (C library prints, dbusmock's log, stray Python prints) can ever corrupt the protocol stream.
# ---------------------------------------------------------------------------------------------
_OUT_FD = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr
_out_lock = threading.Lock()

import dbus  # noqa: E402  dbus-python==1.5.1
import dbus.mainloop.glib  # noqa: E402
import dbus.service  # noqa: E402
from Crypto.Cipher import AES  # noqa: E402  pycryptodome==3.23.0
from dbusmock import mockobject  # noqa: E402  python-dbusmock==0.38.1


def emit(ev, mac=None, **fields):
    obj = {"ev": ev, "t": time.monotonic(), "mac": mac}
    obj.update(fields)
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    with _out_lock:
        view = memoryview(data)
        while view:
            try:
                n = os.write(_OUT_FD, view)
            except BrokenPipeError:
                os._exit(0)
            view = view[n:]


VERBOSE = False


def log(msg):
    print(f"bluez_mock: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
BUS_NAME = "org.bluez"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"
SERVICE_IFACE = "org.bluez.GattService1"
CHRC_IFACE = "org.bluez.GattCharacteristic1"
DESC_IFACE = "org.bluez.GattDescriptor1"
ADAPTER_PATH = "/org/bluez/hci0"

NOKE_SERVICE = "1bc50001-0200-d29e-e511-446c609db825"
NOKE_TX = "1bc50002-0200-d29e-e511-446c609db825"
NOKE_RX = "1bc50003-0200-d29e-e511-446c609db825"
NOKE_SESSION = "1bc50004-0200-d29e-e511-446c609db825"
CCCD_UUID = "00002902-0000-1000-8000-00805f9b34fb"
GAP_UUID = "00001800-0000-1000-8000-00805f9b34fb"
GATT_UUID = "00001801-0000-1000-8000-00805f9b34fb"
BTHOME_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
BASE_UUID_TAIL = "-0000-1000-8000-00805f9b34fb"

ERR_LE_ABORT = "le-connection-abort-by-local"
FILTER_KEYS = ["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData", "Discoverable", "Pattern"]


class OpError(Exception):
    pass


def bz_error(kind, msg):
    return dbus.exceptions.DBusException(msg, name="org.bluez.Error." + kind)


def ay(data):
    return dbus.Array(bytes(data), signature="y")


def to_json(v):
    """D-Bus value (as dbus-python hands it over) -> JSON-able value."""
    if isinstance(v, (bytes, bytearray, dbus.ByteArray)):
        return bytes(v).hex()
    if isinstance(v, dbus.Boolean):
        return bool(v)
    if isinstance(v, (dbus.Byte, int)):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, dict):
        return {str(to_json(k)): to_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        if isinstance(v, dbus.Array) and v.signature == "y":
            return bytes(int(b) for b in v).hex()
        return [to_json(x) for x in v]
    return repr(v)


def full_uuid(u):
    u = u.strip().lower()
    if re.fullmatch(r"[0-9a-f]{4}", u):
        return "0000" + u + BASE_UUID_TAIL
    if re.fullmatch(r"[0-9a-f]{8}", u):
        return u + BASE_UUID_TAIL
    if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", u):
        return u
    raise OpError(f"bad UUID {u!r}")


def parse_hex(s, what, length=None):
    if not isinstance(s, str):
        raise OpError(f"{what} must be a hex string")
    try:
        b = bytes.fromhex(s.replace(" ", ""))
    except ValueError:
        raise OpError(f"{what}: bad hex {s!r}") from None
    if length is not None and len(b) != length:
        raise OpError(f"{what} must be {length} bytes, got {len(b)}")
    return b


def parse_int(v, what):
    if isinstance(v, bool):
        raise OpError(f"{what} must be an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            pass
    raise OpError(f"{what} must be an integer")


# ---------------------------------------------------------------------------------------------
# dbusmock adjustments
# ---------------------------------------------------------------------------------------------
@dbus.service.method(PROPS_IFACE, in_signature="ss", out_signature="v")
def Get(self, interface_name, property_name):  # noqa: N802  (D-Bus name)
    """Properties.Get as bluetoothd answers it: a missing property is InvalidArgs."""
    if not interface_name:
        interface_name = self.interface
    props = self.props.get(interface_name)
    if props is None or property_name not in props:
        raise dbus.exceptions.DBusException(
            f"No such property '{property_name}'", name="org.freedesktop.DBus.Error.InvalidArgs"
        )
    return props[property_name]


mockobject.DBusMockObject.Get = Get


def _mock_log(self, msg):
    if VERBOSE:
        os.write(2, f"dbusmock: {time.time():.3f} {msg}\n".encode())


mockobject.DBusMockObject.log = _mock_log


def install(obj, iface, name, fn):
    """Serve D-Bus method iface.name of a dbusmock object with a dbus.service.method function.

    dbusmock's method lookup consults obj.methods first, so this overrides template methods
    and, unlike AddMethod code, gets dbus-python's sender keyword and async callbacks."""
    obj.methods.setdefault(iface, {})[name] = (
        fn._dbus_in_signature,
        fn._dbus_out_signature,
        "",
        fn,
    )


def props_changed(obj, iface, changed, invalidated=()):
    props = obj.props.setdefault(iface, {})
    for k, v in changed.items():
        props[k] = v
    for k in invalidated:
        props.pop(k, None)
    obj.EmitSignal(
        PROPS_IFACE,
        "PropertiesChanged",
        "sa{sv}as",
        [
            iface,
            dbus.Dictionary(changed, signature="sv"),
            dbus.Array(list(invalidated), signature="s"),
        ],
    )


# ---------------------------------------------------------------------------------------------
# Main loop: GLib's default context iterated through ctypes; Python timers on top.
# ---------------------------------------------------------------------------------------------
_SOURCEFUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class Timer:
    __slots__ = ("fn", "cancelled")

    def __init__(self, fn):
        self.fn = fn
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class Loop:
    TICK_MS = 10

    def __init__(self):
        self.glib = ctypes.CDLL("libglib-2.0.so.0")
        self.glib.g_main_context_iteration.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.glib.g_main_context_iteration.restype = ctypes.c_int
        self.glib.g_main_context_wakeup.argtypes = [ctypes.c_void_p]
        self.glib.g_main_context_wakeup.restype = None
        self.glib.g_timeout_add.argtypes = [ctypes.c_uint, _SOURCEFUNC, ctypes.c_void_p]
        self.glib.g_timeout_add.restype = ctypes.c_uint
        self._tick = _SOURCEFUNC(lambda _data: 1)  # keeps the loop returning every TICK_MS
        self.glib.g_timeout_add(self.TICK_MS, self._tick, None)
        self.heap = []
        self.seq = itertools.count()
        self.inbox = queue.Queue()
        self.running = True

    def after(self, ms, fn):
        t = Timer(fn)
        heapq.heappush(self.heap, (time.monotonic() + ms / 1000.0, next(self.seq), t))
        return t

    def post(self, item):
        """From any thread."""
        self.inbox.put(item)
        self.glib.g_main_context_wakeup(None)

    def run_due(self):
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now:
            _, _, t = heapq.heappop(self.heap)
            if not t.cancelled:
                try:
                    t.fn()
                except Exception as e:  # keep running whatever happens
                    log(f"timer raised {e!r}")
                    emit("error", None, msg=f"internal error in timer: {e!r}")

    def iterate(self):
        self.glib.g_main_context_iteration(None, 1)


# ---------------------------------------------------------------------------------------------
# Simulated devices
# ---------------------------------------------------------------------------------------------
MAC_RE = re.compile(r"^([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})(?::(.*))?$")


class Dev:
    def __init__(self, kind, mac, name):
        self.kind = kind
        self.mac = mac
        self.name = name
        self.path = ADAPTER_PATH + "/dev_" + mac.replace(":", "_")
        self.addr_type = "public"
        self.rssi = -60
        self.manufacturer = {}  # company id -> bytes
        self.service_data = {}  # uuid -> bytes
        self.connectable = kind == "padlock"
        self.awake = True
        self.obj = None  # the exported Device1 DBusMockObject
        self.sent = {}  # what the D-Bus object last showed: name, manufacturer, service_data
        self.connected = False
        self.pending = None  # pending Connect: dict(ok, fail, sender, timer, est)
        # padlock
        self.offline_key = None
        self.battery_mv = 3000
        self.session = None
        self.fixed_session = None
        self.accept = []
        self.accept_total = 0
        self.server_packet = None
        self.accept_unlock = True
        self.accept_cmd_id = None
        self.gatt = None  # dict role -> DBusMockObject once exported
        self.notify_subs = set()
        self.clock_offset = 0.0  # this padlock's clock minus the mock's, seconds
        self.falls_asleep = None  # None, or {"shutdown": bool, "ms": n}: once, at StartNotify
        self.refuse = []  # packets answered 51 61 (invalid key) at once, before any other check
        # BTHome sensor
        self.bind_key = None  # 16 bytes: the sensor encrypts its objects (AES-CCM)
        self.counter = 1  # the next encryption counter

    @property
    def notifying(self):
        return bool(self.notify_subs)

    def info(self):
        return {"mac": self.mac, "kind": self.kind, "name": self.name, "path": self.path}


def parse_spec(kind, spec, positional):
    m = MAC_RE.match(spec)
    if not m:
        raise ValueError(f"--{kind} {spec!r}: must start with a MAC AA:BB:CC:DD:EE:FF")
    mac = m.group(1).upper()
    fields = m.group(2).split(":") if m.group(2) is not None else []
    pos, kv = [], {}
    for f in fields:
        if "=" in f:
            k, v = f.split("=", 1)
            kv[k.strip().lower()] = v.strip()
        elif kv:
            raise ValueError(f"--{kind} {spec!r}: positional field after k=v")
        else:
            pos.append(f)
    if len(pos) > len(positional):
        raise ValueError(
            f"--{kind} {spec!r}: at most {len(positional)} positional fields after the MAC"
        )
    pos += [""] * (len(positional) - len(pos))
    return mac, dict(zip(positional, pos)), kv


def build_device(kind, spec):
    hexmac = None
    if kind == "padlock":
        mac, pos, kv = parse_spec(kind, spec, ["name", "key"])
        hexmac = mac.replace(":", "")
        d = Dev(kind, mac, pos["name"] or f"NOKE3P_{hexmac}")
        if pos["key"]:
            d.offline_key = bytes.fromhex(pos["key"])
            if len(d.offline_key) != 16:
                raise ValueError(f"--padlock {spec!r}: offline key must be 16 bytes")
        company = int(kv.pop("company", "0xFFFF"), 0)
        d.manufacturer = {company: bytes.fromhex(kv.pop("mfg", "00020a"))}
        d.battery_mv = int(kv.pop("battery", "3000"), 0)
        d.rssi = int(kv.pop("rssi", "-60"), 0)
    elif kind == "sensor":
        mac, pos, kv = parse_spec(kind, spec, ["name"])
        d = Dev(kind, mac, pos["name"] or "BTH_" + mac.replace(":", "")[-4:])
        if "bindkey" in kv:
            d.bind_key = bytes.fromhex(kv.pop("bindkey"))
            if len(d.bind_key) != 16:
                raise ValueError(f"--sensor {spec!r}: bindkey must be 16 bytes")
            d.counter = int(kv.pop("counter", "1"), 0)
            data = bthome_data(d, bytes.fromhex(kv.pop("objects", "0164026608")))
        else:
            data = bytes.fromhex(kv.pop("data", "4000010164026608"))
        d.service_data = {BTHOME_UUID: data}
        d.rssi = int(kv.pop("rssi", "-70"), 0)
    else:
        mac, pos, kv = parse_spec(kind, spec, ["name"])
        d = Dev(kind, mac, pos["name"] or "FOB1F_" + mac.replace(":", ""))
        if "mfg" in kv:
            d.manufacturer = {int(kv.pop("company", "0xFFFF"), 0): bytes.fromhex(kv.pop("mfg"))}
        kv.pop("company", None)
        d.rssi = int(kv.pop("rssi", "-65"), 0)
    d.addr_type = kv.pop("type", "public")
    if d.addr_type not in ("public", "random"):
        raise ValueError(f"--{kind} {spec!r}: type must be public or random")
    if kv:
        raise ValueError(f"--{kind} {spec!r}: unknown field(s) {sorted(kv)}")
    return d


def bthome_data(d, objects):
    """BTHome v2 service data for these objects: plain (info 0x40), or encrypted under the
    sensor's bind key (info 0x41 | ciphertext | counter LE | 4-byte MIC; nonce = MAC in display
    order + UUID16 LE + info + counter), the counter advancing by one each time."""
    if d.bind_key is None:
        return bytes([0x40]) + objects
    info = 0x41
    counter = struct.pack("<I", d.counter)
    d.counter += 1
    nonce = bytes.fromhex(d.mac.replace(":", "")) + bytes([0xD2, 0xFC, info]) + counter
    c = AES.new(d.bind_key, AES.MODE_CCM, nonce=nonce, mac_len=4)
    ct, tag = c.encrypt_and_digest(objects)
    return bytes([info]) + ct + counter + tag


def app_packet(*head):
    return bytes(head) + bytes(20 - len(head))


# ---------------------------------------------------------------------------------------------
# The mock
# ---------------------------------------------------------------------------------------------
MOCK = None  # the Mock instance, for the D-Bus method functions below


class Mock:
    def __init__(self, loop, address, devices, opts):
        self.loop = loop
        self.address = address
        self.opts = opts
        self.devices = {d.mac: d for d in devices}
        self.discovery = {}  # sender -> True while it has a discovery session
        self.filters = {}  # sender -> filter dict (JSON form)
        self.watches = {}  # sender -> name-owner watch
        self.clock_offset = 0.0
        self.adv_timer = None
        self.powered = True
        self.down = False  # between the two phases of a "restart"
        self.old_services = []
        self.start_service()

    def start_service(self):
        """Like bluetoothd starting: a new bus connection takes org.bluez and exports the
        template's objects and adapter hci0 (powered, not discovering, no device objects)."""
        self.bus = dbus.bus.BusConnection(self.address)
        self.bus_name = dbus.service.BusName(BUS_NAME, self.bus, do_not_queue=True)
        self.root = mockobject.DBusMockObject(self.bus_name, "/", OM_IFACE, {}, None, True)
        mockobject.objects["/"] = self.root
        self.root.AddTemplate("bluez5", dbus.Dictionary({}, signature="sv"))
        path = self.root.AddAdapter("hci0", "gatehouse-mock")
        assert path == ADAPTER_PATH, path
        self.adapter = mockobject.objects[ADAPTER_PATH]
        for name, fn in (
            ("StartDiscovery", Adapter_StartDiscovery),
            ("StopDiscovery", Adapter_StopDiscovery),
            ("SetDiscoveryFilter", Adapter_SetDiscoveryFilter),
            ("GetDiscoveryFilters", Adapter_GetDiscoveryFilters),
            ("RemoveDevice", Adapter_RemoveDevice),
        ):
            install(self.adapter, ADAPTER_IFACE, name, fn)

    def stop_service(self):
        """Like bluetoothd exiting: every connection, pending connect, notify and discovery
        session ends, every exported object goes (InterfacesRemoved: GATT objects, devices,
        the adapter, /org/bluez), then the bus connection closes, so org.bluez (and the unique
        name) lose their owner (NameOwnerChanged)."""
        for d in self.devices.values():
            self.fail_pending(d, "Software caused connection abort")
            self.drop(d, "restart")
        if self.discovery:
            self.discovery.clear()
            self.discovery_stopped("restart")
        self.filters.clear()
        for w in self.watches.values():
            w.cancel()
        self.watches.clear()
        for d in self.devices.values():
            self.unexport_device(d)
        for path in (ADAPTER_PATH, "/org/bluez"):
            obj = mockobject.objects.get(path)
            if obj is None:
                continue
            ifaces = sorted(
                i
                for i in set(obj.props) | set(obj.methods)
                if i.startswith("org.bluez.") and i != "org.bluez.Mock"
            )
            self.root.RemoveObject(path)
            self.root.EmitSignal(
                OM_IFACE, "InterfacesRemoved", "oas", [dbus.ObjectPath(path), ifaces]
            )
        for path, obj in list(mockobject.objects.items()):
            obj.remove_from_connection()
        mockobject.objects.clear()
        self.adapter = self.root = None
        self.bus.flush()
        self.bus.close()
        # Kept: a collected BusName would try to release its name on the closed connection.
        self.old_services.append((self.bus, self.bus_name))
        self.bus = self.bus_name = None

    def restart(self, down_ms, rid):
        self.stop_service()
        self.down = True
        emit("restarted", None, phase="down", down_ms=down_ms, **rid)

        def up():
            self.start_service()
            self.powered = True
            self.down = False
            emit("restarted", None, phase="up")

        self.loop.after(down_ms, up)

    # -- helpers --
    def now_unix(self):
        return time.time() + self.clock_offset

    def discovering(self):
        return bool(self.discovery)

    def dev(self, req):
        mac = req.get("mac")
        if not isinstance(mac, str) or mac.upper() not in self.devices:
            raise OpError(f"unknown device {mac!r}")
        return self.devices[mac.upper()]

    def padlock(self, req):
        d = self.dev(req)
        if d.kind != "padlock":
            raise OpError(f"{d.mac} is a {d.kind}, not a padlock")
        return d

    def watch(self, sender):
        if not sender or sender in self.watches:
            return

        def owner_changed(new_owner, sender=sender):
            if not new_owner:
                self.loop.after(0, lambda: self.client_gone(sender))

        self.watches[sender] = self.bus.watch_name_owner(sender, owner_changed)

    def client_gone(self, sender):
        w = self.watches.pop(sender, None)
        if w is not None:
            w.cancel()
        self.filters.pop(sender, None)
        if self.discovery.pop(sender, None):
            if not self.discovery:
                self.discovery_stopped(sender)
        for d in self.devices.values():
            if sender in d.notify_subs:
                self.unsubscribe(d, sender)

    # -- discovery --
    def start_discovery(self, sender):
        if not self.powered:
            raise bz_error("NotReady", "Resource Not Ready")
        if sender in self.discovery:
            raise bz_error("InProgress", "Operation already in progress")
        self.watch(sender)
        first = not self.discovery
        self.discovery[sender] = True
        if first:
            props_changed(self.adapter, ADAPTER_IFACE, {"Discovering": dbus.Boolean(True)})
            emit("discovery", None, state="started", sender=sender)
            self.loop.after(self.opts.discover_delay_ms, self.scan_all)
            if self.opts.adv_interval_ms > 0:
                self.adv_timer = self.loop.after(self.opts.adv_interval_ms, self.periodic)

    def stop_discovery(self, sender):
        if sender not in self.discovery:
            raise bz_error("Failed", "No discovery started")
        del self.discovery[sender]
        if not self.discovery:
            self.discovery_stopped(sender)

    def discovery_stopped(self, sender):
        if self.adv_timer is not None:
            self.adv_timer.cancel()
            self.adv_timer = None
        props_changed(self.adapter, ADAPTER_IFACE, {"Discovering": dbus.Boolean(False)})
        for d in self.devices.values():
            if d.obj is not None and not d.connected and "RSSI" in d.obj.props[DEVICE_IFACE]:
                props_changed(d.obj, DEVICE_IFACE, {}, ["RSSI"])
        emit("discovery", None, state="stopped", sender=sender)

    def duplicate_data(self):
        return any(f.get("DuplicateData") for f in self.filters.values())

    def scan_all(self):
        if not self.discovering():
            return
        for d in self.devices.values():
            if d.awake and not d.connected:
                self.advertise(d, report=True)

    def periodic(self):
        if not self.discovering():
            return
        for d in self.devices.values():
            if d.awake and not d.connected:
                self.advertise(d, report=False)
        self.adv_timer = self.loop.after(self.opts.adv_interval_ms, self.periodic)

    # -- advertising / device objects --
    def mfg_value(self, d):
        return dbus.Dictionary(
            {dbus.UInt16(k): ay(v) for k, v in d.manufacturer.items()}, signature="qv"
        )

    def sd_value(self, d):
        return dbus.Dictionary(
            {dbus.String(k): ay(v) for k, v in d.service_data.items()}, signature="sv"
        )

    def export_device(self, d):
        props = {
            "Address": dbus.String(d.mac),
            "AddressType": dbus.String(d.addr_type),
            "Name": dbus.String(d.name),
            "Alias": dbus.String(d.name),
            "Paired": dbus.Boolean(False),
            "Trusted": dbus.Boolean(False),
            "Blocked": dbus.Boolean(False),
            "LegacyPairing": dbus.Boolean(False),
            "Connected": dbus.Boolean(False),
            "UUIDs": dbus.Array(self.device_uuids(d), signature="s"),
            "Adapter": dbus.ObjectPath(ADAPTER_PATH),
            "ServicesResolved": dbus.Boolean(False),
            "AdvertisingFlags": ay(b"\x06"),
            "RSSI": dbus.Int16(d.rssi),
        }
        if d.manufacturer:
            props["ManufacturerData"] = self.mfg_value(d)
        if d.service_data:
            props["ServiceData"] = self.sd_value(d)
        self.root.AddObject(d.path, DEVICE_IFACE, props, [])
        obj = mockobject.objects[d.path]
        obj.sim = d
        for name, fn in (
            ("Connect", Device_Connect),
            ("Disconnect", Device_Disconnect),
            ("Pair", Device_Pair),
            ("CancelPairing", Device_CancelPairing),
            ("ConnectProfile", Device_ConnectProfile),
            ("DisconnectProfile", Device_DisconnectProfile),
        ):
            install(obj, DEVICE_IFACE, name, fn)
        d.obj = obj
        d.sent = {
            "name": d.name,
            "manufacturer": dict(d.manufacturer),
            "service_data": dict(d.service_data),
        }
        self.root.EmitSignal(
            OM_IFACE,
            "InterfacesAdded",
            "oa{sa{sv}}",
            [dbus.ObjectPath(d.path), {DEVICE_IFACE: obj.props[DEVICE_IFACE]}],
        )

    def device_uuids(self, d):
        if d.gatt is not None:
            return [GAP_UUID, GATT_UUID, NOKE_SERVICE]
        return []

    def advertise(self, d, report=True, force=False):
        """One advertisement of d reaches the adapter (if it can). Returns the event fields."""
        if not (d.awake and not d.connected and self.discovering()):
            res = {"delivered": False, "created": False, "changed": []}
        elif d.obj is None:
            self.export_device(d)
            res = {"delivered": True, "created": True, "changed": sorted(d.obj.props[DEVICE_IFACE])}
        else:
            dup = force or self.duplicate_data()
            changed = {"RSSI": dbus.Int16(d.rssi)}
            if d.name != d.sent["name"]:
                changed["Name"] = dbus.String(d.name)
                changed["Alias"] = dbus.String(d.name)
            invalid = []
            if d.manufacturer != d.sent["manufacturer"] or (dup and d.manufacturer):
                if d.manufacturer:
                    changed["ManufacturerData"] = self.mfg_value(d)
                else:
                    invalid.append("ManufacturerData")
            if d.service_data != d.sent["service_data"] or (dup and d.service_data):
                if d.service_data:
                    changed["ServiceData"] = self.sd_value(d)
                else:
                    invalid.append("ServiceData")
            props_changed(d.obj, DEVICE_IFACE, changed, invalid)
            d.sent = {
                "name": d.name,
                "manufacturer": dict(d.manufacturer),
                "service_data": dict(d.service_data),
            }
            res = {"delivered": True, "created": False, "changed": sorted(changed) + invalid}
        if report:
            emit("advert", d.mac, **res)
        return res

    def unexport_device(self, d):
        if d.obj is None:
            return
        if d.pending:
            self.fail_pending(d)
        if d.connected:
            self.drop(d, "remove")
        if d.gatt is not None:
            for role in ("desc", "session", "rx", "tx", "service"):
                obj = d.gatt[role]
                ifaces = list(obj.props.keys())
                self.root.RemoveObject(obj.path)
                self.root.EmitSignal(
                    OM_IFACE, "InterfacesRemoved", "oas", [dbus.ObjectPath(obj.path), ifaces]
                )
            d.gatt = None
        self.root.RemoveObject(d.path)
        self.root.EmitSignal(
            OM_IFACE, "InterfacesRemoved", "oas", [dbus.ObjectPath(d.path), [DEVICE_IFACE]]
        )
        d.obj = None
        d.sent = {}

    # -- connections --
    def connect(self, d, sender, ok, fail):
        if d.connected:
            ok()
            return
        if d.pending is not None:
            fail(bz_error("InProgress", "In Progress"))
            return
        p = {"ok": ok, "fail": fail, "sender": sender, "est": None}
        p["timer"] = self.loop.after(self.opts.connect_timeout_ms, lambda: self.fail_pending(d))
        d.pending = p
        emit("connecting", d.mac, sender=sender)
        self.try_establish(d)

    def try_establish(self, d):
        p = d.pending
        if p is None or p["est"] is not None or not (d.connectable and d.awake):
            return
        p["est"] = self.loop.after(self.opts.connect_ms, lambda: self.establish(d))

    def establish(self, d):
        p = d.pending
        if p is None:
            return
        if not (d.connectable and d.awake):  # fell asleep again meanwhile: keep waiting
            p["est"] = None
            return
        p["timer"].cancel()
        d.connected = True
        d.session = d.fixed_session or self.new_session(d)
        props_changed(d.obj, DEVICE_IFACE, {"Connected": dbus.Boolean(True)})
        if d.gatt is None:
            self.export_gatt(d)
            props_changed(
                d.obj, DEVICE_IFACE, {"UUIDs": dbus.Array(self.device_uuids(d), signature="s")}
            )
        p["est"] = self.loop.after(self.opts.resolve_ms, lambda: self.resolved(d))

    def resolved(self, d):
        p = d.pending
        if p is None or not d.connected:
            return
        d.pending = None
        props_changed(d.obj, DEVICE_IFACE, {"ServicesResolved": dbus.Boolean(True)})
        p["ok"]()
        emit("connected", d.mac, sender=p["sender"], session=d.session.hex() if d.session else None)

    def fail_pending(self, d, message=ERR_LE_ABORT):
        p = d.pending
        if p is None:
            return
        d.pending = None
        p["timer"].cancel()
        if p["est"] is not None:
            p["est"].cancel()
        if d.connected:  # connected but not yet resolved: undo
            self.drop(d, "client", announce=False)
        p["fail"](bz_error("Failed", message))
        emit("connect_failed", d.mac, error="org.bluez.Error.Failed", message=message)

    def new_session(self, d):
        s = bytearray(os.urandom(20))
        s[2:4] = struct.pack("<H", d.battery_mv & 0xFFFF)
        return bytes(s)

    def drop(self, d, by, announce=True):
        if not d.connected:
            return
        d.connected = False
        if d.gatt is not None and d.notify_subs:
            d.notify_subs.clear()
            props_changed(d.gatt["rx"], CHRC_IFACE, {"Notifying": dbus.Boolean(False)})
        d.notify_subs.clear()
        props_changed(
            d.obj,
            DEVICE_IFACE,
            {"ServicesResolved": dbus.Boolean(False), "Connected": dbus.Boolean(False)},
        )
        if announce:
            emit("disconnected", d.mac, by=by)
        if d.awake and self.discovering():
            self.loop.after(20, lambda: self.resume_advertising(d))

    def resume_advertising(self, d):
        """First advertisement after a connection ended (if the device still can)."""
        if d.awake and not d.connected and d.pending is None and self.discovering():
            self.advertise(d)

    def disconnect(self, d, by):
        if d.pending is not None:
            self.fail_pending(d)
        self.drop(d, by)

    # -- GATT --
    def export_gatt(self, d):
        svc = d.path + "/service000a"
        mtu = dbus.UInt16(self.opts.mtu)
        objs = {}

        def add(role, path, iface, props, methods):
            self.root.AddObject(path, iface, props, [])
            o = mockobject.objects[path]
            o.sim = d
            o.role = role
            for name, fn in methods:
                install(o, iface, name, fn)
            objs[role] = o
            self.root.EmitSignal(
                OM_IFACE,
                "InterfacesAdded",
                "oa{sa{sv}}",
                [dbus.ObjectPath(path), {iface: o.props[iface]}],
            )

        chrc_methods = [
            ("ReadValue", Chrc_ReadValue),
            ("WriteValue", Chrc_WriteValue),
            ("StartNotify", Chrc_StartNotify),
            ("StopNotify", Chrc_StopNotify),
            ("AcquireWrite", Chrc_AcquireWrite),
            ("AcquireNotify", Chrc_AcquireNotify),
        ]
        add(
            "service",
            svc,
            SERVICE_IFACE,
            {
                "UUID": dbus.String(NOKE_SERVICE),
                "Device": dbus.ObjectPath(d.path),
                "Primary": dbus.Boolean(True),
                "Includes": dbus.Array([], signature="o"),
            },
            [],
        )

        def chrc(uuid, flags, extra=None):
            p = {
                "UUID": dbus.String(uuid),
                "Service": dbus.ObjectPath(svc),
                "Value": ay(b""),
                "Flags": dbus.Array(flags, signature="s"),
                "MTU": mtu,
            }
            p.update(extra or {})
            return p

        add(
            "tx",
            svc + "/char000b",
            CHRC_IFACE,
            chrc(NOKE_TX, ["write-without-response", "write"]),
            chrc_methods,
        )
        add(
            "rx",
            svc + "/char000d",
            CHRC_IFACE,
            chrc(NOKE_RX, ["notify"], {"Notifying": dbus.Boolean(False)}),
            chrc_methods,
        )
        add(
            "desc",
            svc + "/char000d/desc000f",
            DESC_IFACE,
            {
                "UUID": dbus.String(CCCD_UUID),
                "Characteristic": dbus.ObjectPath(svc + "/char000d"),
                "Value": ay(b""),
            },
            [("ReadValue", Desc_ReadValue), ("WriteValue", Desc_WriteValue)],
        )
        add("session", svc + "/char0010", CHRC_IFACE, chrc(NOKE_SESSION, ["read"]), chrc_methods)
        d.gatt = objs

    @staticmethod
    def char_name(obj):
        return {"tx": "0002", "rx": "0003", "session": "0004", "desc": "2902"}[obj.role]

    def need_connected(self, d):
        if not d.connected:
            raise bz_error("Failed", "Not connected")

    def read_value(self, obj, options):
        d = obj.sim
        self.need_connected(d)
        flags = [str(f) for f in obj.props[CHRC_IFACE]["Flags"]]
        if "read" not in flags:
            raise bz_error("NotPermitted", "Read not permitted")
        value = d.session
        offset = int(options.get("offset", 0))
        if offset > len(value):
            raise bz_error("InvalidOffset", "Invalid offset")
        props_changed(obj, CHRC_IFACE, {"Value": ay(value)})
        emit("read", d.mac, char=self.char_name(obj), hex=value.hex(), offset=offset)
        return dbus.ByteArray(value[offset:])

    def write_value(self, obj, value, options):
        d = obj.sim
        self.need_connected(d)
        flags = [str(f) for f in obj.props[CHRC_IFACE]["Flags"]]
        wtype = str(options.get("type", ""))
        if not wtype:
            wtype = "request" if "write" in flags else "command"
        if wtype == "command" and "write-without-response" not in flags:
            raise bz_error("NotSupported", "Operation is not supported")
        if wtype == "request" and "write" not in flags:
            raise bz_error("NotPermitted", "Write not permitted")
        if wtype not in ("command", "request"):
            raise bz_error("NotSupported", f"Write type {wtype} not supported")
        if int(options.get("offset", 0)) != 0:
            raise bz_error("InvalidOffset", "Invalid offset")
        data = bytes(value)
        emit("write", d.mac, char=self.char_name(obj), hex=data.hex(), type=wtype)
        self.loop.after(self.opts.notify_delay_ms, lambda: self.judge(d, data))

    def subscribe(self, obj, sender):
        d = obj.sim
        self.need_connected(d)
        if "notify" not in [str(f) for f in obj.props[CHRC_IFACE]["Flags"]]:
            raise bz_error("NotSupported", "Operation is not supported")
        if sender in d.notify_subs:
            raise bz_error("InProgress", "In Progress")
        self.watch(sender)
        first = not d.notify_subs
        d.notify_subs.add(sender)
        if first:
            props_changed(obj, CHRC_IFACE, {"Notifying": dbus.Boolean(True)})
        emit("notify_state", d.mac, char="0003", on=True, sender=sender)
        if d.falls_asleep is not None:
            fa, d.falls_asleep = d.falls_asleep, None
            if fa["ms"] == 0:
                # At once: the notification goes out before StartNotify's reply, in the gap
                # before a client that subscribes after StartNotify (bluer does) listens.
                self.fall_asleep(d, fa["shutdown"])
            else:
                self.loop.after(fa["ms"], lambda: self.fall_asleep(d, fa["shutdown"]))

    def fall_asleep(self, d, shutdown):
        """The padlock's idle timeout: it goes to sleep (0x64 with the timeout flag, unless
        silent) and drops the link before anything was written."""
        if not d.connected:
            return
        d.awake = False
        if shutdown:
            self.notify(d, app_packet(0x51, 0x64, 0x01, 0x00))
        emit("fell_asleep", d.mac, shutdown=shutdown)
        self.loop.after(max(self.opts.notify_delay_ms, 1), lambda: self.drop(d, "sleep"))

    def unsubscribe(self, d, sender):
        if sender not in d.notify_subs:
            raise bz_error("Failed", "No notify session started")
        d.notify_subs.discard(sender)
        if not d.notify_subs and d.gatt is not None:
            props_changed(d.gatt["rx"], CHRC_IFACE, {"Notifying": dbus.Boolean(False)})
        emit("notify_state", d.mac, char="0003", on=False, sender=sender)

    def notify(self, d, data):
        delivered = d.connected and d.notifying
        if delivered:
            props_changed(d.gatt["rx"], CHRC_IFACE, {"Value": ay(data)})
        emit("notify", d.mac, char="0003", hex=data.hex(), delivered=delivered)

    # -- the padlock's protocol --
    def judge(self, d, pkt):
        if not d.connected:
            return
        if len(pkt) != 20:
            return self.invalid(d, pkt, "length")
        if pkt in d.refuse:
            return self.invalid(d, pkt, "refused")
        if d.accept:
            if pkt == d.accept[0]:
                d.accept.pop(0)
                index = d.accept_total - len(d.accept) - 1
                cmd = d.accept_cmd_id if d.accept_cmd_id is not None else pkt[3]
                self.notify(d, app_packet(0x51, 0x60, cmd))
                emit("accepted", d.mac, hex=pkt.hex(), index=index, remaining=len(d.accept))
                if not d.accept:
                    if d.server_packet is not None:
                        sp = d.server_packet
                        self.loop.after(
                            self.opts.notify_delay_ms, lambda: d.connected and self.notify(d, sp)
                        )
                    if d.accept_unlock:
                        emit("unlocked", d.mac, via="online")
                return None
            if pkt in d.accept:
                return self.invalid(d, pkt, "out_of_order")
        if d.offline_key is None or d.session is None:
            return self.invalid(d, pkt, "no_key")
        key = bytes((d.offline_key[i] + d.session[i]) & 0xFF for i in range(16))
        plain = AES.new(key, AES.MODE_ECB).encrypt(pkt[4:20])
        if plain[15] != sum(plain[:15]) & 0xFF:
            return self.invalid(d, pkt, "checksum")
        ts = struct.unpack("<I", plain[2:6])[0]
        skew = ts - (self.now_unix() + d.clock_offset)
        if abs(skew) > self.opts.time_window_s:
            return self.invalid(d, pkt, "time", time=ts, skew=round(skew, 3))
        self.notify(d, app_packet(0x51, 0x60, pkt[3]))
        emit("unlocked", d.mac, via="offline", time=ts, skew=round(skew, 3))
        return None

    def invalid(self, d, pkt, reason, **extra):
        self.notify(d, app_packet(0x51, 0x61))
        emit("invalid_packet", d.mac, hex=pkt.hex(), reason=reason, **extra)

    # -- stdin ops --
    def handle(self, req):
        op = req.get("op")
        rid = {"id": req["id"]} if "id" in req else {}
        if op == "quit":
            return False
        if op == "state":
            emit("state", None, **self.state(), **rid)
        elif op == "add":
            kind = req.get("kind")
            if kind not in ("padlock", "sensor", "fob"):
                raise OpError("kind must be padlock, sensor or fob")
            try:
                d = build_device(kind, str(req.get("spec", "")))
            except ValueError as e:
                raise OpError(str(e))
            if d.mac in self.devices:
                raise OpError(f"{d.mac} exists")
            self.devices[d.mac] = d
            res = self.advertise(d, report=False)
            emit("added", d.mac, kind=kind, name=d.name, **res, **rid)
        elif op in ("advert", "sensor"):
            d = self.dev(req)
            if op == "sensor" and "objects" in req:
                if d.kind != "sensor":
                    raise OpError("not a sensor")
                objects = parse_hex(req.get("objects"), "objects")
                d.service_data = {BTHOME_UUID: bthome_data(d, objects)}
            elif op == "sensor":
                d.service_data = {BTHOME_UUID: parse_hex(req.get("hex"), "hex")}
            else:
                self.apply_advert(d, req)
            res = self.advertise(d, report=False, force=bool(req.get("force")))
            emit("advert", d.mac, **res, **rid)
        elif op == "restart":
            if self.down:
                raise OpError("bluetoothd is already restarting")
            down_ms = parse_int(req.get("down_ms", 300), "down_ms")
            if not 0 <= down_ms <= 600_000:
                raise OpError("down_ms out of range")
            self.restart(down_ms, rid)
        elif op == "power":
            if self.down:
                raise OpError("bluetoothd is down (restart)")
            on = bool(req.get("on"))
            if on != self.powered:
                self.powered = on
                if not on:
                    for d in self.devices.values():
                        self.fail_pending(d)
                        self.drop(d, "power")
                    if self.discovery:
                        for sender in list(self.discovery):
                            del self.discovery[sender]
                        self.discovery_stopped("power")
                props_changed(self.adapter, ADAPTER_IFACE, {"Powered": dbus.Boolean(on)})
            emit("ack", None, op="power", on=on, **rid)
        elif op == "sleep":
            d = self.padlock(req)
            d.awake = False
            if d.connected:
                if req.get("shutdown", True):
                    lock_state = parse_int(req.get("lock_state", 1), "lock_state") & 0xFF
                    tflag = parse_int(req.get("timeout_flag", 1), "timeout_flag") & 0xFF
                    self.notify(d, app_packet(0x51, 0x64, lock_state, tflag))
                self.loop.after(max(self.opts.notify_delay_ms, 1), lambda: self.drop(d, "sleep"))
            emit("ack", d.mac, op=op, **rid)
        elif op == "wake":
            d = self.padlock(req)
            d.awake = True
            emit("ack", d.mac, op=op, **rid)
            if d.pending is not None:
                self.try_establish(d)
            elif not d.connected:
                self.advertise(d, report=True)
        elif op == "accept_packets":
            d = self.padlock(req)
            pkts = req.get("packets")
            if not isinstance(pkts, list):
                raise OpError("packets must be a list of hex strings")
            d.accept = [parse_hex(p, "packet", 20) for p in pkts]
            d.accept_total = len(d.accept)
            sp = req.get("server_packet")
            d.server_packet = parse_hex(sp, "server_packet") if sp is not None else None
            d.accept_unlock = bool(req.get("unlock", True))
            cid = req.get("cmd_id")
            d.accept_cmd_id = parse_int(cid, "cmd_id") & 0xFF if cid is not None else None
            emit("ack", d.mac, op=op, count=len(d.accept), **rid)
        elif op == "notify":
            d = self.padlock(req)
            data = parse_hex(req.get("hex"), "hex")
            if not d.connected:
                raise OpError(f"{d.mac} is not connected")
            self.notify(d, data)
            emit("ack", d.mac, op=op, **rid)
        elif op == "disconnect":
            d = self.dev(req)
            was = d.connected
            self.drop(d, "device")
            emit("ack", d.mac, op=op, was_connected=was, **rid)
        elif op == "config":
            d = self.padlock(req)
            if "battery_mv" in req:
                d.battery_mv = parse_int(req["battery_mv"], "battery_mv") & 0xFFFF
            if "offline_key" in req:
                k = req["offline_key"]
                d.offline_key = parse_hex(k, "offline_key", 16) if k is not None else None
            if "session" in req:
                s = req["session"]
                d.fixed_session = parse_hex(s, "session", 20) if s is not None else None
                if d.connected and d.fixed_session is not None:
                    d.session = d.fixed_session
            if "connectable" in req:
                d.connectable = bool(req["connectable"])
            if "rssi" in req:
                d.rssi = parse_int(req["rssi"], "rssi")
            if "clock_offset_s" in req:
                d.clock_offset = float(parse_int(req["clock_offset_s"], "clock_offset_s"))
            if "falls_asleep" in req:
                fa = req["falls_asleep"]
                if fa is None:
                    d.falls_asleep = None
                elif isinstance(fa, dict):
                    d.falls_asleep = {
                        "shutdown": bool(fa.get("shutdown", True)),
                        "ms": parse_int(fa.get("ms", 0), "falls_asleep.ms"),
                    }
                else:
                    raise OpError("falls_asleep must be an object or null")
            if "refuse_packets" in req:
                pkts = req["refuse_packets"]
                if not isinstance(pkts, list):
                    raise OpError("refuse_packets must be a list of hex strings")
                d.refuse = [parse_hex(x, "packet", 20) for x in pkts]
            emit("ack", d.mac, op=op, **rid)
        elif op == "clock":
            if req.get("real"):
                self.clock_offset = 0.0
            elif "unix" in req:
                self.clock_offset = float(req["unix"]) - time.time()
            elif "offset" in req:
                self.clock_offset = float(req["offset"])
            else:
                raise OpError("clock needs unix, offset or real")
            emit("ack", None, op=op, offset=self.clock_offset, **rid)
        elif op == "remove":
            d = self.dev(req)
            was = d.obj is not None
            self.unexport_device(d)
            emit("ack", d.mac, op=op, was_exported=was, **rid)
        else:
            raise OpError(f"unknown op {op!r}")
        return True

    def apply_advert(self, d, req):
        if "rssi" in req:
            d.rssi = parse_int(req["rssi"], "rssi")
            if not -127 <= d.rssi <= 20:
                raise OpError("rssi out of range")
        if "name" in req:
            if not isinstance(req["name"], str) or not req["name"]:
                raise OpError("name must be a non-empty string")
            d.name = req["name"]
        if "manufacturer" in req:
            m = req["manufacturer"]
            if m is None:
                d.manufacturer = {}
            elif isinstance(m, dict):
                d.manufacturer = {
                    parse_int(k, "company id") & 0xFFFF: parse_hex(v, "manufacturer data")
                    for k, v in m.items()
                }
            else:
                raise OpError("manufacturer must be an object or null")
        if "service_data" in req:
            s = req["service_data"]
            if s is None:
                d.service_data = {}
            elif isinstance(s, dict):
                d.service_data = {full_uuid(k): parse_hex(v, "service data") for k, v in s.items()}
            else:
                raise OpError("service_data must be an object or null")

    def state(self):
        devs = []
        for d in self.devices.values():
            devs.append(
                {
                    **d.info(),
                    "exported": d.obj is not None,
                    "awake": d.awake,
                    "connected": d.connected,
                    "connecting": d.pending is not None,
                    "notifying": d.notifying,
                    "rssi": d.rssi,
                    "manufacturer": {str(k): v.hex() for k, v in d.manufacturer.items()},
                    "service_data": {k: v.hex() for k, v in d.service_data.items()},
                    "accept_pending": len(d.accept),
                }
            )
        return {
            "bluetoothd": "down" if self.down else "up",
            "discovering": self.discovering(),
            "discovery_clients": sorted(self.discovery),
            "clock_offset": self.clock_offset,
            "devices": devs,
        }


# ---------------------------------------------------------------------------------------------
# D-Bus method implementations (installed into dbusmock objects with install())
# ---------------------------------------------------------------------------------------------
def _method(iface, in_sig="", out_sig="", async_=False):
    kw = {
        "in_signature": in_sig,
        "out_signature": out_sig,
        "sender_keyword": "sender",
        "byte_arrays": True,
    }
    if async_:
        kw["async_callbacks"] = ("ok", "fail")
    return dbus.service.method(iface, **kw)


@_method(ADAPTER_IFACE)
def Adapter_StartDiscovery(adapter, sender=None):  # noqa: N802
    MOCK.start_discovery(sender)


@_method(ADAPTER_IFACE)
def Adapter_StopDiscovery(adapter, sender=None):  # noqa: N802
    MOCK.stop_discovery(sender)


@_method(ADAPTER_IFACE, "a{sv}")
def Adapter_SetDiscoveryFilter(adapter, flt, sender=None):  # noqa: N802
    for k in flt:
        if k not in FILTER_KEYS:
            raise bz_error("InvalidArguments", f"Invalid arguments in method call: unknown key {k}")
    if "Transport" in flt and str(flt["Transport"]) not in ("auto", "bredr", "le"):
        raise bz_error("InvalidArguments", "Invalid arguments in method call")
    f = {str(k): to_json(v) for k, v in flt.items()}
    MOCK.watch(sender)
    if f:
        MOCK.filters[sender] = f
    else:
        MOCK.filters.pop(sender, None)
    emit("discovery_filter", None, sender=sender, filter=f)


@_method(ADAPTER_IFACE, "", "as")
def Adapter_GetDiscoveryFilters(adapter, sender=None):  # noqa: N802
    return dbus.Array(FILTER_KEYS, signature="s")


@_method(ADAPTER_IFACE, "o")
def Adapter_RemoveDevice(adapter, path, sender=None):  # noqa: N802
    for d in MOCK.devices.values():
        if d.path == str(path) and d.obj is not None:
            MOCK.unexport_device(d)
            return
    raise bz_error("DoesNotExist", "Does Not Exist")


@_method(DEVICE_IFACE, async_=True)
def Device_Connect(obj, sender=None, ok=None, fail=None):  # noqa: N802
    MOCK.connect(obj.sim, sender, ok, fail)


@_method(DEVICE_IFACE)
def Device_Disconnect(obj, sender=None):  # noqa: N802
    MOCK.disconnect(obj.sim, "client")


@_method(DEVICE_IFACE)
def Device_Pair(obj, sender=None):  # noqa: N802
    raise bz_error("NotSupported", "Pairing is not simulated")


@_method(DEVICE_IFACE)
def Device_CancelPairing(obj, sender=None):  # noqa: N802
    raise bz_error("DoesNotExist", "Does Not Exist")


@_method(DEVICE_IFACE, "s")
def Device_ConnectProfile(obj, uuid, sender=None):  # noqa: N802
    raise bz_error("NotSupported", "Operation is not supported")


@_method(DEVICE_IFACE, "s")
def Device_DisconnectProfile(obj, uuid, sender=None):  # noqa: N802
    raise bz_error("NotSupported", "Operation is not supported")


@_method(CHRC_IFACE, "a{sv}", "ay")
def Chrc_ReadValue(obj, options, sender=None):  # noqa: N802
    return MOCK.read_value(obj, options)


@_method(CHRC_IFACE, "aya{sv}")
def Chrc_WriteValue(obj, value, options, sender=None):  # noqa: N802
    MOCK.write_value(obj, value, options)


@_method(CHRC_IFACE)
def Chrc_StartNotify(obj, sender=None):  # noqa: N802
    MOCK.subscribe(obj, sender)


@_method(CHRC_IFACE)
def Chrc_StopNotify(obj, sender=None):  # noqa: N802
    if obj.role != "rx":
        raise bz_error("NotSupported", "Operation is not supported")
    MOCK.unsubscribe(obj.sim, sender)


@_method(CHRC_IFACE, "a{sv}", "hq")
def Chrc_AcquireWrite(obj, options, sender=None):  # noqa: N802
    emit("error", obj.sim.mac, msg="AcquireWrite called: not supported by the mock, use WriteValue")
    raise bz_error("NotSupported", "Operation is not supported")


@_method(CHRC_IFACE, "a{sv}", "hq")
def Chrc_AcquireNotify(obj, options, sender=None):  # noqa: N802
    emit(
        "error", obj.sim.mac, msg="AcquireNotify called: not supported by the mock, use StartNotify"
    )
    raise bz_error("NotSupported", "Operation is not supported")


@_method(DESC_IFACE, "a{sv}", "ay")
def Desc_ReadValue(obj, options, sender=None):  # noqa: N802
    MOCK.need_connected(obj.sim)
    return dbus.ByteArray(b"\x01\x00" if obj.sim.notifying else b"\x00\x00")


@_method(DESC_IFACE, "aya{sv}")
def Desc_WriteValue(obj, value, options, sender=None):  # noqa: N802
    raise bz_error("NotPermitted", "Write not permitted: use StartNotify")


# ---------------------------------------------------------------------------------------------
# The private bus
# ---------------------------------------------------------------------------------------------
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <keep_umask/>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


def _pdeathsig():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_bus(tmpdir):
    sock = os.path.join(tmpdir, "system_bus_socket")
    conf = os.path.join(tmpdir, "bus.conf")
    with open(conf, "w") as f:
        f.write(BUS_CONF.format(sock=sock))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={conf}", "--print-address", "--nofork", "--nosyslog"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None if VERBOSE else subprocess.DEVNULL,
        preexec_fn=_pdeathsig,
    )
    line = proc.stdout.readline().decode().strip()
    if not line:
        proc.wait()
        raise RuntimeError(f"dbus-daemon exited with {proc.returncode} before printing its address")
    return proc, line


def stop_bus(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    global MOCK, VERBOSE
    ap = argparse.ArgumentParser(description="mock BlueZ on a private D-Bus (see file header)")
    ap.add_argument(
        "--padlock", action="append", default=[], metavar="MAC[:NAME[:OFFLINEKEY]][:k=v]..."
    )
    ap.add_argument("--sensor", action="append", default=[], metavar="MAC[:NAME][:k=v]...")
    ap.add_argument("--fob", action="append", default=[], metavar="MAC[:NAME][:k=v]...")
    ap.add_argument("--connect-ms", type=int, default=30)
    ap.add_argument("--resolve-ms", type=int, default=20)
    ap.add_argument("--connect-timeout-ms", type=int, default=1000)
    ap.add_argument("--discover-delay-ms", type=int, default=50)
    ap.add_argument("--notify-delay-ms", type=int, default=10)
    ap.add_argument("--adv-interval-ms", type=int, default=0)
    ap.add_argument("--time-window-s", type=float, default=300.0)
    ap.add_argument("--mtu", type=int, default=23)
    ap.add_argument("--bus-dir", default=None)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    VERBOSE = args.verbose
    devices = []
    try:
        for kind in ("padlock", "sensor", "fob"):
            for spec in getattr(args, kind):
                devices.append(build_device(kind, spec))
    except ValueError as e:
        ap.error(str(e))
    if len({d.mac for d in devices}) != len(devices):
        ap.error("duplicate MAC")

    if args.bus_dir:
        os.makedirs(args.bus_dir, exist_ok=True)
        tmpdir = args.bus_dir
    else:
        tmpdir = tempfile.mkdtemp(prefix="bluez_mock.")
    try:
        bus_proc, address = start_bus(tmpdir)
    except (OSError, RuntimeError) as e:
        log(f"cannot start dbus-daemon: {e}")
        if not args.bus_dir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return 1

    rc = 0
    try:
        dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
        loop = Loop()
        MOCK = Mock(loop, address, devices, args)

        def on_signal(signum, frame):
            loop.running = False

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        def reader():
            stdin = sys.stdin.buffer
            while True:
                try:
                    line = stdin.readline()
                except (OSError, ValueError):
                    line = b""
                if not line:
                    loop.post(None)
                    return
                loop.post(line)

        threading.Thread(target=reader, daemon=True).start()
        emit(
            "ready",
            None,
            address=address,
            adapter=ADAPTER_PATH,
            devices=[d.info() for d in devices],
        )

        while loop.running:
            loop.iterate()
            loop.run_due()
            if bus_proc.poll() is not None:
                log(f"dbus-daemon died (exit {bus_proc.returncode})")
                emit("error", None, msg="dbus-daemon died")
                rc = 1
                break
            while loop.running:
                try:
                    line = loop.inbox.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    loop.running = False
                    break
                line = line.strip()
                if not line:
                    continue
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise OpError("a line must be a JSON object")
                except (ValueError, OpError) as e:
                    emit("error", None, msg=f"bad line: {e}")
                    continue
                try:
                    if not MOCK.handle(req):
                        loop.running = False
                except OpError as e:
                    extra = {"id": req["id"]} if "id" in req else {}
                    mac = req.get("mac").upper() if isinstance(req.get("mac"), str) else None
                    emit("error", mac, msg=str(e), op=req.get("op"), **extra)
                except Exception as e:  # keep running whatever happens
                    log(f"op {req.get('op')!r} raised {e!r}")
                    emit("error", None, msg=f"internal error: {e!r}", op=req.get("op"))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_bus(bus_proc)
        if args.bus_dir:
            for f in ("system_bus_socket", "bus.conf"):
                try:
                    os.unlink(os.path.join(tmpdir, f))
                except OSError:
                    pass
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    rc = main()
    sys.stderr.flush()
    os._exit(rc)  # do not wait for anything else at interpreter shutdown
