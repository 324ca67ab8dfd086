#!/usr/bin/env python3
"""modbus_dev.py - a Modbus RTU bus with simulated devices (test peer for gatehouse).

Needs Python 3.11 and `pymodbus[serial]==3.16.1` (pulls `pyserial==3.5`), see
tests/requirements.txt. Nothing else beyond the standard library.

WHAT IT DOES
  pymodbus's ModbusSerialServer needs a serial port path, so the peer makes two pty pairs and
  relays bytes between their master sides (a thread with select, like socat): pymodbus opens
  the slave of pair A; the symlink `--link` points at the slave of pair B, which gatehouse
  opens (baud and parity mean nothing on a pty). The peer keeps its own fds of both slaves
  open for its whole life, so gatehouse may close and reopen the port without a hang-up.
  One pymodbus RTU server answers for every configured device address; a request for an
  address that is not configured, or for a silenced device, gets no answer at all (the
  master times out), whatever the function code. Broadcast (address 0) is not answered and
  not executed. Requests are served one at a time, in order.

COMMAND LINE
  modbus_dev.py --link PATH --device ADDR:KIND [--device ADDR:KIND ...] [--verbose]
    --link PATH    symlink to create (an existing one is replaced atomically; on exit it is
                   removed if it still points at this peer's pty).
    --device       ADDR = 1..247 (decimal or 0x..), KIND one of relay8, relay8d, io8, xymd02.
    --verbose      pymodbus debug logging to stderr.
  Exit status 0 after "quit", stdin EOF, SIGTERM or SIGINT; 2 on bad arguments; 1 if the
  pty/link/server cannot be set up. Diagnostics go to stderr (never to stdout).

DEVICE MODELS  (any access outside the map below -> exception 02 ILLEGAL DATA ADDRESS;
                a multi-register read/write must lie entirely inside mapped registers)
  relay8   Waveshare Modbus RTU Relay, 8 ch.
           Coils 0x0000-0x0007 (FC01 read, FC05 write, FC0F write; all start off).
           FC05 values at 0x0000-0x0007: 0xFF00 on, 0x0000 off, 0x5500 toggle; any other value
             -> exception 03 ILLEGAL DATA VALUE. The reply echoes the request.
           FC05 to 0x00FF: the same three values applied to all 8 relays.
           FC05 to 0x0200+ch (ch 0..7) "flash on": relay ch turns on now and off again after
             value x 100 ms (value 0..0xFFFF, the board times it; value 0 = off at once).
           FC05 to 0x0400+ch "flash off": relay ch turns off now and on again after
             value x 100 ms.
             ASSUMPTION (Waveshare wiki, "Modbus RTU Relay" development protocol V2): the
             delay is in 100 ms units and the reply echoes the request. Every later write
             to a channel (FC05/FC0F, incl. another flash) cancels its pending flash timer.
           Holding registers (FC03 read; FC06/FC10 write):
             0x2000 baud code, default 0x0001 (low byte: 0 4800, 1 9600, 2 19200, ...;
                    high byte parity 0 none/1 even/2 odd); stored only, no effect.
             0x4000 device address (reads the address; writing 1..247 moves the device to
                    that address 50 ms after the reply, which still comes from the old one;
                    an address already used by another simulated device -> exception 03).
             0x8000 firmware version 0x0100, read-only (a write -> exception 02).
  relay8d  relay8 plus 8 discrete inputs 0x0000-0x0007 (FC02), set with the "input" op.
  io8      Waveshare Modbus RTU IO 8CH: discrete inputs 0x0000-0x0007 (FC02) and 8 outputs as
           coils 0x0000-0x0007 with relay8's FC01/FC05 (0xFF00/0x0000/0x5500, 0x00FF all)/FC0F
           semantics, and the same holding registers. ASSUMPTION: no board-timed flash on
           this model (0x0200/0x0400 -> exception 02).
  xymd02   XY-MD02 temperature/humidity sensor. Input registers (FC04): 0x0001 temperature
           (signed 16-bit, 0.1 degC; default 21.5 degC = 215), 0x0002 relative humidity
           (0.1 %RH; default 45.0 % = 450). Holding (FC03/FC06/FC10): 0x0101 device address
           (as 0x4000 above), 0x0102 baud code (0 9600, 1 14400, 2 19200; stored only),
           0x0103 temperature correction, 0x0104 humidity correction (stored only).
           No coils or discrete inputs.
  Other function codes pymodbus knows (0x08 diagnostics, 0x11 report server id, 0x16 mask
  write register, 0x17 read/write registers, 0x2B device identification, ...) are answered
  by pymodbus itself, through the same register map where they touch registers (0x16/0x17
  act on the holding registers). A function code pymodbus does not know is not answered;
  a request it cannot decode (e.g. a count of 0) gets exception 01 ILLEGAL FUNCTION.
  Bytes that cannot be decoded and get no new bytes within 20 ms are dropped when the next
  bytes arrive (an RTU frame gap), so garbage does not swallow the following request.

STDIN: one JSON object per line, processed in order. "addr" is the address given with
  --device (a device moved by a write to its address register keeps that id). Every op may
  carry "id" (any JSON value), echoed in the "ack"/"error" event that answers it.
  {"op":"input","addr":A,"index":i,"on":bool}        set discrete input i (relay8d, io8)
  {"op":"temp","addr":A,"celsius":21.5,"rh":40.0}     set temperature and/or humidity (xymd02;
                                                       either field may be left out)
  {"op":"silent","addr":A,"on":bool}                  on=true: the device stops answering
                                                       (its state and flash timers go on)
  {"op":"state"}                                      one "state" event
  {"op":"quit"}                                       exit 0
  A malformed line, unknown op/device or bad field -> an "error" event; the peer goes on.

STDOUT: one JSON object per line, written and flushed at once. Every object has "ev",
  "t" (float, time.monotonic() of this process in seconds = CLOCK_MONOTONIC) and "addr"
  (configured device address, null for bus-level events).
  {"ev":"ready","addr":null,"link":PATH,"tty":"/dev/pts/N","devices":[{"addr":A,"kind":K},..]}
  {"ev":"write","addr":A,"fc":n,"address":n,"values":[...],"exception":null|code}
      every write request to a configured, answering device: fc 5 (values = [raw 16-bit
      value]), 15 (values = [0|1,...]), 6 and 16 (register values), 22/23 (values written).
      Emitted when the request is processed, before its coil events and before the reply.
      "exception" is the Modbus exception code sent back instead of the normal reply.
      (A request pymodbus rejects before it reaches the register map, e.g. FC0F with a byte
      count that does not match its bit count, gets its exception without a "write" event.)
  {"ev":"coil","addr":A,"index":i,"on":bool,"cause":"write"|"flash"}
      every change of a coil, emitted the instant the new state is stored (inside the
      request handling, before the reply; or when a flash timer fires: cause "flash").
      Writing a coil to the state it already has emits nothing.
  {"ev":"address","addr":A,"from":old,"to":new}    device A now answers at bus address new
  {"ev":"ack","addr":A,"op":"input"|"temp"|"silent",...echo of the op's fields}
  {"ev":"state","addr":null,"devices":[{"addr":A,"bus_addr":n,"kind":K,"silent":bool,
        "coils":[bool x8]|null,"inputs":[bool x8]|null,"temp_raw":n|null,"rh_raw":n|null}]}
  {"ev":"error","addr":A|null,"msg":"text"[,"op":..][,"id":..]}
"""

import argparse
import asyncio
import json
import logging
import os
import select
import signal
import struct
import sys
import threading
import time
import tty

from pymodbus import FramerType, pymodbus_apply_logging_config
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import ModbusIOException, NoSuchIdException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.transaction import TransactionManager

# ---------------------------------------------------------------------------------------------
# Output: JSON lines on the original stdout; fd 1 now points at stderr.
# ---------------------------------------------------------------------------------------------
_OUT_FD = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr
_out_lock = threading.Lock()


def emit(ev, addr=None, **fields):
    obj = {"ev": ev, "t": time.monotonic(), "addr": addr}
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


def log(msg):
    print(f"modbus_dev: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Device models
# ---------------------------------------------------------------------------------------------
ON, OFF, TOGGLE = 0xFF00, 0x0000, 0x5500
INTERFRAME_GAP_S = 0.020
KINDS = ("relay8", "relay8d", "io8", "xymd02")


class ModbusError(Exception):
    def __init__(self, code):
        super().__init__(int(code))
        self.code = code


class Device:
    def __init__(self, addr, kind):
        self.id = addr  # configured address: stable id on stdin/stdout
        self.bus_addr = addr
        self.kind = kind
        self.silent = False
        self.coils = [False] * 8 if kind in ("relay8", "relay8d", "io8") else None
        self.inputs = [False] * 8 if kind in ("relay8d", "io8") else None
        self.flash = kind in ("relay8", "relay8d")
        self.timers = {}  # channel -> asyncio.TimerHandle
        if kind == "xymd02":
            self.inreg = {0x0001: 215, 0x0002: 450}
            self.holding = {0x0101: addr, 0x0102: 0, 0x0103: 0, 0x0104: 0}
            self.addr_reg = 0x0101
            self.readonly = set()
        else:
            self.inreg = {}
            self.holding = {0x2000: 0x0001, 0x4000: addr, 0x8000: 0x0100}
            self.addr_reg = 0x4000
            self.readonly = {0x8000}


class Bus:
    """All device state; used only from the asyncio loop thread."""

    def __init__(self, devices, loop):
        self.devices = devices  # list[Device]
        self.loop = loop

    def by_bus_addr(self, a):
        for d in self.devices:
            if d.bus_addr == a:
                return d
        return None

    def answers(self, a):
        d = self.by_bus_addr(a)
        return d is not None and not d.silent

    def device(self, a):
        d = self.by_bus_addr(a)
        if d is None or d.silent:
            raise NoSuchIdException(f"no device {a}")
        return d

    # -- coils --
    def set_coil(self, d, ch, on, cause="write"):
        if d.coils[ch] != on:
            d.coils[ch] = on
            emit("coil", d.id, index=ch, on=on, cause=cause)

    def cancel_timer(self, d, ch):
        h = d.timers.pop(ch, None)
        if h is not None:
            h.cancel()

    def _flash_end(self, d, ch, on):
        d.timers.pop(ch, None)
        self.set_coil(d, ch, on, cause="flash")

    def write_single_coil(self, dev_id, address, value):
        d = self.device(dev_id)
        try:
            if d.coils is None:
                raise ModbusError(ExcCodes.ILLEGAL_ADDRESS)
            if address < 8 or address == 0x00FF:
                if value not in (ON, OFF, TOGGLE):
                    raise ModbusError(ExcCodes.ILLEGAL_VALUE)
                chans = range(8) if address == 0x00FF else [address]
                emit("write", d.id, fc=5, address=address, values=[value], exception=None)
                for ch in chans:
                    self.cancel_timer(d, ch)
                    new = (not d.coils[ch]) if value == TOGGLE else (value == ON)
                    self.set_coil(d, ch, new)
                return
            if d.flash and (0x0200 <= address < 0x0208 or 0x0400 <= address < 0x0408):
                ch = address & 0x7
                first = address < 0x0400  # flash on: on now, off later
                emit("write", d.id, fc=5, address=address, values=[value], exception=None)
                self.cancel_timer(d, ch)
                self.set_coil(d, ch, first)
                d.timers[ch] = self.loop.call_later(
                    value * 0.1, self._flash_end, d, ch, not first
                )
                return
            raise ModbusError(ExcCodes.ILLEGAL_ADDRESS)
        except ModbusError as e:
            emit("write", d.id, fc=5, address=address, values=[value], exception=int(e.code))
            raise

    # -- generic table access (called by pymodbus through the context) --
    def get_values(self, dev_id, fc, address, count):
        d = self.device(dev_id)
        if fc in (1, 2):
            table = d.coils if fc == 1 else d.inputs
            if table is None or address < 0 or count < 1 or address + count > len(table):
                return ExcCodes.ILLEGAL_ADDRESS
            return list(table[address : address + count])
        regs = d.inreg if fc == 4 else d.holding
        out = []
        for a in range(address, address + count):
            if a not in regs:
                return ExcCodes.ILLEGAL_ADDRESS
            out.append(regs[a])
        return out

    def set_values(self, dev_id, fc, address, values):
        d = self.device(dev_id)
        vals = [int(v) for v in values]
        try:
            if fc == 15:
                if d.coils is None or address < 0 or address + len(vals) > 8:
                    raise ModbusError(ExcCodes.ILLEGAL_ADDRESS)
                emit("write", d.id, fc=fc, address=address, values=vals, exception=None)
                for i, v in enumerate(vals):
                    self.cancel_timer(d, address + i)
                    self.set_coil(d, address + i, bool(v))
                return None
            if fc in (6, 16, 22, 23):
                new_addr = None
                for i, v in enumerate(vals):
                    a = address + i
                    if a not in d.holding or a in d.readonly:
                        raise ModbusError(ExcCodes.ILLEGAL_ADDRESS)
                    if not 0 <= v <= 0xFFFF:
                        raise ModbusError(ExcCodes.ILLEGAL_VALUE)
                    if a == d.addr_reg:
                        other = self.by_bus_addr(v)
                        if not 1 <= v <= 247 or (other is not None and other is not d):
                            raise ModbusError(ExcCodes.ILLEGAL_VALUE)
                        new_addr = v
                emit("write", d.id, fc=fc, address=address, values=vals, exception=None)
                for i, v in enumerate(vals):
                    d.holding[address + i] = v
                if new_addr is not None and new_addr != d.bus_addr:
                    self.loop.call_later(0.05, self._move, d, new_addr)
                return None
            raise ModbusError(ExcCodes.ILLEGAL_FUNCTION)
        except ModbusError as e:
            emit("write", d.id, fc=fc, address=address, values=vals, exception=int(e.code))
            return e.code

    def _move(self, d, new_addr):
        old = d.bus_addr
        d.bus_addr = new_addr
        emit("address", d.id, **{"from": old, "to": new_addr})


class BusContext(ModbusServerContext):
    """Datastore handed to pymodbus: every read and write goes through the Bus above.

    pymodbus 3.16 deprecates ModbusServerContext in favour of SimDevice, but still routes a
    context flagged `old_simulator` straight to async_getValues/async_setValues; that is the
    hook used here (no polling: the write is applied inside the request handling).
    """

    def __init__(self, bus):  # pylint: disable=super-init-not-called
        self.bus = bus
        self.old_simulator = True
        self.simdevices = []
        self._devices = {}

    def device_ids(self):
        return [d.bus_addr for d in self.bus.devices if not d.silent]

    async def async_getValues(self, device_id, func_code, address, count=1):
        return self.bus.get_values(device_id, func_code, address, count)

    async def async_setValues(self, device_id, func_code, address, values):
        return self.bus.set_values(device_id, func_code, address, values)


class WriteCoilRaw(ModbusPDU):
    """FC05 keeping the raw 16-bit value (pymodbus's own class turns it into a bool, which
    loses 0x5500 toggle and the flash delays) and echoing it in the reply."""

    function_code = 5
    rtu_frame_size = 8

    def __init__(self, address=0, value=0, dev_id=0, transaction_id=0):
        super().__init__(dev_id=dev_id, transaction_id=transaction_id, address=address)
        self.value = value

    def encode(self):
        return struct.pack(">HH", self.address, self.value)

    def decode(self, data):
        self.address, self.value = struct.unpack(">HH", data[:4])

    async def datastore_update(self, context, device_id):
        try:
            context.bus.write_single_coil(device_id, self.address, self.value)
        except ModbusError as e:
            return ExceptionResponse(self.function_code, e.code)
        return WriteCoilRaw(self.address, self.value, dev_id=device_id,
                            transaction_id=self.transaction_id)

    def __str__(self):
        return f"WriteCoilRaw(dev_id={self.dev_id}, address={self.address:#06x}, value={self.value:#06x})"


class SilentAwareHandler(ServerRequestHandler):
    """Drops every request whose address is not an answering simulated device, and bytes
    that stayed undecodable across an RTU inter-frame gap."""

    bus = None
    _stale_len = 0  # undecoded bytes left at the end of the buffer by the last call
    _stale_at = 0.0

    def callback_data(self, data, addr=None):
        now = time.monotonic()
        skip = 0
        if self._stale_len and now - self._stale_at > INTERFRAME_GAP_S:
            # pymodbus's RTU framer keeps an undecodable fragment (e.g. an unknown function
            # code) and would glue the next request to it; a real device's frame timer
            # (3.5 characters of silence) would have dropped it.
            skip = min(self._stale_len, len(data))
        used = skip + self._handle(data[skip:], addr)
        self._stale_len = len(data) - used
        self._stale_at = now
        return used

    def _handle(self, data, addr):
        if not data:
            return 0
        try:
            used_len = TransactionManager.callback_data(self, data, addr)
        except ModbusIOException as exc:
            if self.bus.answers(exc.dev_id):
                fcode = exc.fcode
                if fcode is None:  # pymodbus does not say which; take it from the frame
                    fcode = data[1] & 0x7F if len(data) > 1 and data[0] == exc.dev_id else 0
                response = ExceptionResponse(
                    fcode,
                    exception_code=ExcCodes.ILLEGAL_FUNCTION,
                    device_id=exc.dev_id,
                    transaction=exc.transaction_id,
                )
                self.server_send(response, addr)
            return len(data)
        if self.last_pdu:
            if not self.bus.answers(self.last_pdu.dev_id):
                self.last_pdu = None
                return used_len
            self.loop.call_soon(self.handle_later)
        return used_len


class PeerSerialServer(ModbusSerialServer):
    def callback_new_connection(self):
        return SilentAwareHandler(self, self.trace_packet, self.trace_pdu, self.trace_connect)


# ---------------------------------------------------------------------------------------------
# pty relay
# ---------------------------------------------------------------------------------------------
def relay(a, b, stop):
    """Copy bytes both ways between pty masters a and b until stop is set."""
    pending = {a: bytearray(), b: bytearray()}  # bytes waiting to be written to that fd
    while not stop.is_set():
        wl = [fd for fd, buf in pending.items() if buf]
        try:
            r, w, _ = select.select([a, b], wl, [], 0.1)
        except (OSError, ValueError):
            return
        for src in r:
            dst = b if src == a else a
            try:
                data = os.read(src, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                time.sleep(0.01)
                continue
            pending[dst] += data
            w = list(set(w) | {dst})
        for dst in w:
            buf = pending[dst]
            if not buf:
                continue
            try:
                n = os.write(dst, buf)
                del buf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                log(f"relay write failed: {e}")
                buf.clear()


def make_pty():
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


def make_link(link, target):
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)


def remove_link(link, target):
    try:
        if os.readlink(link) == target:
            os.unlink(link)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# stdin ops (parsed in the stdin thread, applied in the loop thread)
# ---------------------------------------------------------------------------------------------
class OpError(Exception):
    pass


def get_bool(req, key):
    v = req.get(key)
    if not isinstance(v, bool):
        raise OpError(f'"{key}" must be true or false')
    return v


def apply_op(bus, req, stop):
    op = req.get("op")
    extra = {"id": req["id"]} if "id" in req else {}
    if op == "quit":
        stop()
        return
    if op == "state":
        emit("state", None, devices=[
            {
                "addr": d.id,
                "bus_addr": d.bus_addr,
                "kind": d.kind,
                "silent": d.silent,
                "coils": list(d.coils) if d.coils is not None else None,
                "inputs": list(d.inputs) if d.inputs is not None else None,
                "temp_raw": struct.unpack(">h", struct.pack(">H", d.inreg[1]))[0] if d.inreg else None,
                "rh_raw": d.inreg[2] if d.inreg else None,
            }
            for d in bus.devices
        ], **extra)
        return
    a = req.get("addr")
    dev = next((d for d in bus.devices if d.id == a and not isinstance(a, bool)), None)
    if dev is None:
        raise OpError(f"unknown addr {a!r}")
    if op == "input":
        if dev.inputs is None:
            raise OpError(f"device {a} ({dev.kind}) has no inputs")
        i = req.get("index")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(dev.inputs):
            raise OpError('"index" must be 0..7')
        on = get_bool(req, "on")
        dev.inputs[i] = on
        emit("ack", dev.id, op="input", index=i, on=on, **extra)
    elif op == "temp":
        if dev.kind != "xymd02":
            raise OpError(f"device {a} ({dev.kind}) is not an xymd02")
        fields = {}
        for key, reg, lo, hi in (("celsius", 1, -3276.8, 3276.7), ("rh", 2, 0.0, 6553.5)):
            if key in req:
                v = req[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                    raise OpError(f'"{key}" must be a number in {lo}..{hi}')
                fields[key] = (reg, v)
        if not fields:
            raise OpError('give "celsius" and/or "rh"')
        for key, (reg, v) in fields.items():
            dev.inreg[reg] = round(v * 10) & 0xFFFF
        emit("ack", dev.id, op="temp", **{k: v for k, (_, v) in fields.items()}, **extra)
    elif op == "silent":
        dev.silent = get_bool(req, "on")
        emit("ack", dev.id, op="silent", on=dev.silent, **extra)
    else:
        raise OpError(f"unknown op {op!r}")


def stdin_lines():
    """Lines of fd 0, read unbuffered (no BufferedReader lock held by this daemon thread)."""
    buf = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            if buf:
                yield buf
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from lines


def stdin_reader(loop, bus, stop):
    def run(req):
        try:
            apply_op(bus, req, stop)
        except OpError as e:
            extra = {"id": req["id"]} if "id" in req else {}
            a = req.get("addr") if isinstance(req.get("addr"), int) else None
            emit("error", a, msg=str(e), op=req.get("op"), **extra)
        except Exception as e:  # keep running whatever happens
            emit("error", None, msg=f"internal error: {e!r}", op=req.get("op"))

    for line in stdin_lines():
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a line must be a JSON object")
        except ValueError as e:
            emit("error", None, msg=f"bad line: {e}")
            continue
        loop.call_soon_threadsafe(run, req)
        if req.get("op") == "quit":
            return
    loop.call_soon_threadsafe(stop)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_device(spec):
    try:
        a, kind = spec.split(":")
        addr = int(a, 0)
    except ValueError:
        raise ValueError(f"bad --device {spec!r} (want ADDR:KIND)")
    if not 1 <= addr <= 247:
        raise ValueError(f"address out of range 1..247 in {spec!r}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    return addr, kind


async def amain(args, specs):
    loop = asyncio.get_running_loop()
    devices = [Device(a, k) for a, k in specs]
    bus = Bus(devices, loop)
    SilentAwareHandler.bus = bus
    done = asyncio.Event()

    def stop():
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)

    try:
        ma, sa, name_a = make_pty()
        mb, sb, name_b = make_pty()
    except OSError as e:
        log(f"cannot create ptys: {e}")
        return 1
    relay_stop = threading.Event()
    threading.Thread(target=relay, args=(ma, mb, relay_stop), name="relay", daemon=True).start()

    server = PeerSerialServer(
        BusContext(bus),
        framer=FramerType.RTU,
        port=name_a,
        baudrate=9600,
        ignore_missing_devices=True,
        broadcast_enable=False,
        custom_pdu=[WriteCoilRaw],
    )
    try:
        await server.serve_forever(background=True)
    except Exception as e:
        log(f"cannot start the pymodbus server on {name_a}: {e!r}")
        return 1
    link = os.path.abspath(args.link)
    try:
        make_link(link, name_b)
    except OSError as e:
        log(f"cannot create link {link}: {e}")
        await server.shutdown()
        return 1

    threading.Thread(target=stdin_reader, args=(loop, bus, stop), name="stdin", daemon=True).start()
    emit("ready", None, link=link, tty=name_b,
         devices=[{"addr": d.id, "kind": d.kind} for d in devices])
    try:
        await done.wait()
    finally:
        remove_link(link, name_b)
        for d in devices:
            for h in d.timers.values():
                h.cancel()
        try:
            await asyncio.wait_for(server.shutdown(), 2)
        except Exception:
            pass
        relay_stop.set()
    return 0


def main():
    ap = argparse.ArgumentParser(description="Modbus RTU device bus peer (see file header)")
    ap.add_argument("--link", required=True)
    ap.add_argument("--device", action="append", required=True, metavar="ADDR:KIND")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    try:
        specs = [parse_device(s) for s in args.device]
    except ValueError as e:
        ap.error(str(e))
    if len({a for a, _ in specs}) != len(specs):
        ap.error("duplicate device address")
    if args.verbose:
        pymodbus_apply_logging_config(logging.DEBUG)
    else:
        # pymodbus warns about its deprecated datastore API on every start; keep stderr quiet.
        pymodbus_apply_logging_config(logging.ERROR)
    return asyncio.run(amain(args, specs))


if __name__ == "__main__":
    rc = main()
    sys.stderr.flush()
    os._exit(rc)  # daemon threads (stdin, relay) may still block in read/select
