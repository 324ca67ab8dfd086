#!/usr/bin/env python3
"""osdp_pd.py - an RS-485 OSDP bus with one or more LibOSDP PeripheralDevices (test peer).

Part of gatehouse's integration tests. Needs Python 3.11 and `libosdp==3.2.9` (import `osdp`),
see tests/requirements.txt. Nothing else beyond the standard library.

WHAT IT DOES
  Creates a pseudo-terminal, puts its slave side in raw mode and points the symlink `--link`
  at the slave tty (`/dev/pts/N`); gatehouse opens that path as its OSDP serial port (baud and
  parity are ignored by a pty). The peer keeps its own fd of the slave open for its whole
  life, so gatehouse may close and reopen the port without a hang-up.
  Behind the pty sits an emulated multidrop bus with one LibOSDP PeripheralDevice per `--pd`.
  Bytes from the CP (gatehouse) are cut into OSDP frames (SOM 0x53 + LEN; an optional 0xFF
  mark byte before SOM is kept) and each frame is handed to the PD whose address matches
  (a 0x7F broadcast goes to every PD); frames for other addresses are dropped, exactly what a
  LibOSDP PD on a shared bus does with them. A PD is refreshed the moment a frame reaches it
  (POLL -> ACK took 0.1 ms here) and every PD is refreshed at least every 10 ms. Everything a PD
  writes goes to the pty. Frames that stay incomplete for 100 ms are discarded.
  PD replies are not echoed to the other PDs, and there is no RS-485 echo.

COMMAND LINE
  osdp_pd.py --link PATH --pd SPEC [--pd SPEC ...] [--log-level LEVEL]
    --link PATH   symlink to create (an existing symlink/file at PATH is replaced atomically;
                  on exit it is removed if it still points at this peer's pty).
    --pd SPEC     ADDR[:MODE][:enforce][:baud=N]  ADDR = 0..126 (decimal, or 0x.. hex)
                  MODE = 32 hex chars: the PD's SCBK (secure channel base key);
                         install : no key, LibOSDP install mode: accepts a secure channel
                                   under SCBK-D (30 31 .. 3F) and then a KEYSET; after the
                                   KEYSET the PD uses the new key (kept in memory only);
                         nosc    : no secure channel. The PD reports CommunicationSecurity
                                   compliance 0 in its PDCAP reply and answers osdp_CHLNG with
                                   NAK 0x05; it talks plaintext only.
                         (MODE omitted = install)
                  baud=N: the PD listens at N baud only: a frame reaches it only when the
                           pty's line speed (set by gatehouse, read with TCGETS2 when the
                           frame's bytes arrive) is N, as a PD at another rate on a real bus
                           hears garbage. A COMSET moves it to its new rate. Without baud=N
                           the PD hears frames at any line speed (a pty has no real rate).
                  enforce: LibOSDP ENFORCE_SECURE flag (only together with an SCBK): with SC
                           inactive only ID, CAP, CHLNG and SCRYPT are accepted (others get
                           NAK), SCBK-D is refused.
                  Every PD declares: OutputControl 1 output, LED 1 LED, Audible 1, Text 1
                  line, CardDataFormat, Readers 1 (and LibOSDP adds CRC, SC, buffer size).
                  PDID: vendor 0x0A1B2C, model 2, version 1, serial 0x47480000+ADDR,
                  firmware 1.2.3.
    --log-level   LibOSDP log level to stderr: error|warning|info|debug (default warning).
  Exit status 0 after "quit", stdin EOF, SIGTERM or SIGINT; 2 on bad arguments; 1 if the
  pty/link cannot be set up. Diagnostics go to stderr (never to stdout).

STDIN: one JSON object per line, processed in order. Every op may carry "id" (any JSON value);
  it is echoed in the "sent"/"ack"/"error" event that answers the op. "pd" is the PD's
  configured address (the one given with --pd, even after a COMSET changed it).
  {"op":"keys","pd":A,"digits":"1234#"}
      keypad event(s). Optional: "each":true -> one KEYPAD reply per key (default: a single
      event carrying all keys); "gap_ms":N -> sleep N ms between keys when "each" (default 0);
      "reader":R (default 0); "encoding":"osdp" (default) sends keys as a real reader does:
      '0'-'9' -> 0x30-0x39, '#' -> 0x0D, '*' -> 0x7F, any other character as its ASCII code;
      "encoding":"ascii" sends the characters' ASCII codes unchanged ('#' -> 0x23).
      Instead of "digits", "hex":"31320d" sends these raw bytes.
  {"op":"card","pd":A,"bits":26,"hex":"..."}
      card read, reply osdp_RAW (0x50). "bits" = number of bits (1..512). The bits, MSB first,
      are given by exactly one of:
        "hex": ceil(bits/8) bytes exactly as on the wire: first bit = MSB of the first byte,
               left-justified, unused low bits of the last byte 0. For 26 bits: 4 bytes.
        "value": integer holding the bits right-justified (e.g. the 26-bit H10301 word with
               its parity bits); the peer left-justifies it.
        "facility" (0..255) and "number" (0..65535): an H10301 26-bit card; the peer adds the
               parity bits (bit 1 even parity over bits 2-13, bit 26 odd over bits 14-25);
               "bits" may be omitted (26).
      Optional "format":"wiegand" (default, RAW format code 1) | "raw" (format code 0);
      "reader":R (default 0).
  {"op":"tamper","pd":A,"on":true}
      local status report (osdp_LSTATR, unsolicited, sent in the reply to the next POLL):
      tamper byte = on, power byte = "power" (optional bool, default false = power OK).
      LibOSDP 3.2.9's Python binding cannot answer a CP's osdp_LSTAT with data: an LSTAT
      poll is always answered tamper=0 power=0.
  {"op":"silent","pd":A,"on":true}
      on=true: the PD receives nothing (frames addressed to it are dropped) and so never
      answers; the CP sees it go offline. on=false: back to normal.
  {"op":"state"}          -> one "state" event (see below).
  {"op":"quit"}           -> exit 0.
  A malformed line, unknown op, unknown PD or bad field -> an "error" event; the peer goes on.

STDOUT: one JSON object per line, written and flushed at once. Every object has
  "ev" (string), "t" (float, time.monotonic() of this process in seconds; same clock as
  CLOCK_MONOTONIC, so comparable with the Rust side's Instant on Linux) and "pd" (the PD's
  configured address, or null for bus-level events).
  {"ev":"ready","pd":null,"link":PATH,"tty":"/dev/pts/N","pds":[A,...]}
      once, when the link exists and the PDs run.
  Commands from the CP, one event per command as LibOSDP's command callback sees it (the
  callback always returns 0, so the PD ACKs):
  {"ev":"output","pd":A,"output_no":n,"control_code":c,"timer_count":t}        (osdp_OUT)
  {"ev":"led","pd":A,"reader":r,"led_number":n,"temporary":bool,"control_code":c,
        "on_color":c,"off_color":c,"on_count":n,"off_count":n[,"timer_count":n]
        [,"cancel_temporary":true]}   (osdp_LED. LibOSDP's binding reports the temporary
        settings (with timer_count) when their control code is non-zero, else the permanent
        ones; temporary control code 1 (cancel) together with a permanent setting is reported
        as the permanent settings plus "cancel_temporary":true)
  {"ev":"buzzer","pd":A,"reader":r,"control_code":c,"on_count":n,"off_count":n,
        "rep_count":n}                                                           (osdp_BUZ)
  {"ev":"text","pd":A,"reader":r,"control_code":c,"temp_time":n,"offset_row":n,
        "offset_col":n,"data":"string"}                                          (osdp_TEXT)
  {"ev":"keyset","pd":A,"type":1,"key":"32 hex chars"}    (osdp_KEYSET; from now on the PD
        uses this SCBK: LibOSDP drops the session and the CP re-runs the handshake)
  {"ev":"comset","pd":A,"address":n,"baud_rate":n}    (osdp_COMSET, before the reply)
  {"ev":"comset_done","pd":A,"address":n,"baud_rate":n}  (after the reply; from now on the PD
        answers at the new address; the baud rate means nothing on a pty)
  {"ev":"mfg","pd":A,"vendor_code":n,"mfg_command":n,"data":"hex"}             (osdp_MFG)
  {"ev":"command","pd":A,"command":n,"raw":"python repr of LibOSDP's dict"}   anything else
        (e.g. command 9 = a status query LSTAT/ISTAT/OSTAT/RSTAT, "raw" has its "type":
        0 input, 1 output, 2 local, 3 remote).
        NOTE: osdp_OSTAT (and ISTAT/RSTAT) cannot be answered by LibOSDP 3.2.9's Python
        binding: the PD replies NAK, and a LibOSDP CP then takes the PD offline. Don't send
        OSTAT/ISTAT to this peer.
  {"ev":"sent","pd":A,"op":"keys","data":"hex of all key bytes","events":n[,"id":..]}
        after a "keys" op; "t" = when the last key event was handed to LibOSDP.
  {"ev":"sent","pd":A,"op":"card","bits":n,"hex":"wire bytes","format":n[,"id":..]}
  {"ev":"sent","pd":A,"op":"tamper","on":bool,"power":bool[,"id":..]}
  {"ev":"delivered","pd":A,"event":"keypress"|"cardread"|"status","data":"hex"|null,
        "status":n,"ok":bool}
        LibOSDP's event-completion callback: the reply carrying that event was written to the
        bus (status 0 = OK) or the event was dropped (status != 0). One per submitted event.
  {"ev":"ack","pd":A,"op":"silent","on":bool[,"id":..]}
  {"ev":"sc","pd":A,"active":bool,"scbk_d":bool}
        the PD's own secure-channel state changed (LibOSDP is_sc_active()). "scbk_d": the PD is
        still in install mode (no KEYSET yet), i.e. an active session runs under SCBK-D.
        Initially every PD is inactive; only changes are reported. LibOSDP ends a session
        after 8 s without a valid command and on a KEYSET.
  {"ev":"online","pd":A,"online":bool}
        the PD's view (LibOSDP is_online()): a frame addressed to it arrived within the last
        8 s. Initially false; only changes are reported (checked every 10 ms).
  {"ev":"state","pd":null,"pds":[{"pd":A,"address":current address,"sc":bool,
        "online":bool,"silent":bool,"tamper":bool,"mode":"key"|"install"|"nosc","baud":n|null,
        "key":"hex"|null},...]}
  {"ev":"error","pd":A|null,"msg":"text"[,"op":..][,"id":..]}
"""

import argparse
import fcntl
import json
import os
import select
import signal
import struct
import sys
import threading
import time
import tty

import osdp  # libosdp==3.2.9

# ---------------------------------------------------------------------------------------------
# Output: JSON lines on the original stdout; fd 1 is pointed at stderr so that nothing else
# (C library prints, stray Python prints) can ever corrupt the protocol stream.
# ---------------------------------------------------------------------------------------------
_OUT_FD = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr
_out_lock = threading.Lock()


def emit(ev, pd=None, **fields):
    obj = {"ev": ev, "t": time.monotonic(), "pd": pd}
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
    print(f"osdp_pd: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# OSDP framing helpers (only what the bus emulation and the `nosc` mode need).
# ---------------------------------------------------------------------------------------------
SOM = 0x53
MARK = 0xFF
MIN_FRAME = 7  # SOM ADDR LEN LEN CTRL CMD CKSUM
MAX_FRAME = 1536
STALE_PARTIAL_S = 0.100


def crc16(data):
    crc = 0x1D0F
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def finalize(frame):
    """Recompute the CRC/checksum of a complete frame (bytes from SOM)."""
    frame = bytearray(frame)
    if frame[4] & 0x04:
        c = crc16(frame[:-2])
        frame[-2] = c & 0xFF
        frame[-1] = c >> 8
    else:
        frame[-1] = (-sum(frame[:-1])) & 0xFF
    return bytes(frame)


class FrameSplitter:
    """Cuts a byte stream into OSDP frames: yields (has_mark, frame_from_SOM)."""

    def __init__(self):
        self.buf = bytearray()
        self.last_rx = 0.0

    def feed(self, data):
        self.buf += data
        self.last_rx = time.monotonic()
        return self._extract()

    def _extract(self):
        out = []
        buf = self.buf
        while True:
            i = buf.find(bytes([SOM]))
            if i < 0:
                keep = 1 if buf and buf[-1] == MARK else 0
                del buf[: len(buf) - keep]
                break
            mark = i > 0 and buf[i - 1] == MARK
            if i > (1 if mark else 0):
                del buf[: i - (1 if mark else 0)]
                continue
            start = 1 if mark else 0
            if len(buf) - start < 5:
                break
            plen = buf[start + 2] | (buf[start + 3] << 8)
            if plen < MIN_FRAME or plen > MAX_FRAME:
                del buf[: start + 1]  # not a frame start; resync after this SOM
                continue
            if len(buf) - start < plen:
                break
            out.append((mark, bytes(buf[start : start + plen])))
            del buf[: start + plen]
        return out

    def expire(self, now):
        """Drop a partial frame that has not grown for STALE_PARTIAL_S; returns new frames."""
        if self.buf and now - self.last_rx > STALE_PARTIAL_S:
            mark = self.buf[0] == MARK
            del self.buf[: 2 if mark else 1]
            self.last_rx = now
            return self._extract()
        return []


def rewrite_nosc_reply(frame):
    """For a `nosc` PD: hide SC support. frame = bytes from SOM. Returns the frame to send."""
    if len(frame) < 8:
        return frame
    ctrl = frame[4]
    pos = 5
    if ctrl & 0x08:
        pos += frame[5]  # skip the security control block
    if pos >= len(frame):
        return frame
    code = frame[pos]
    tail = 2 if ctrl & 0x04 else 1
    if code == 0x46 and not ctrl & 0x08:  # PDCAP in plaintext: CommunicationSecurity -> 0
        f = bytearray(frame)
        j = pos + 1
        while j + 3 <= len(f) - tail:
            if f[j] == 9:
                f[j + 1] = 0
                f[j + 2] = 0
            j += 3
        return finalize(f)
    if code == 0x76:  # CCRYPT: answer the CHLNG like a PD without SC support: NAK 0x05
        body = bytes([SOM, frame[1], 0, 0, ctrl & 0x07, 0x41, 0x05]) + b"\0" * tail
        body = bytearray(body)
        body[2] = len(body) & 0xFF
        body[3] = len(body) >> 8
        return finalize(body)
    return frame


# ---------------------------------------------------------------------------------------------
# The PDs
# ---------------------------------------------------------------------------------------------
CAPS = [
    (osdp.Capability.OutputControl, 1, 1),
    (osdp.Capability.LEDControl, 1, 1),
    (osdp.Capability.AudibleControl, 1, 1),
    (osdp.Capability.TextOutput, 1, 1),
    (osdp.Capability.CardDataFormat, 1, 1),
    (osdp.Capability.Readers, 1, 1),
]

EVENT_NAMES = {
    osdp.Event.CardRead: "cardread",
    osdp.Event.KeyPress: "keypress",
    osdp.Event.Status: "status",
    osdp.Event.ManufacturerReply: "mfgrep",
}


def jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    return v


class BusChannel(osdp.Channel):
    """LibOSDP channel of one PD: reads from its own input buffer, writes to the pty."""

    def __init__(self, bus, pd_state):
        super().__init__()
        self.bus = bus
        self.st = pd_state
        self.inbuf = bytearray()
        self.out_split = FrameSplitter() if pd_state.mode == "nosc" else None

    def read(self, max_bytes):
        if not self.inbuf:
            return b""
        data = bytes(self.inbuf[:max_bytes])
        del self.inbuf[:max_bytes]
        return data

    def write(self, buf):
        buf = bytes(buf)
        if self.out_split is None:
            self.bus.write_wire(buf)
        else:
            for mark, frame in self.out_split.feed(buf):
                self.bus.write_wire((b"\xff" if mark else b"") + rewrite_nosc_reply(frame))
        return len(buf)

    def flush(self):
        pass


class PdState:
    def __init__(self, addr, mode, key, enforce):
        self.addr = addr  # configured address: the id used on stdin/stdout
        self.cur_addr = addr  # bus address (changes after a COMSET)
        self.mode = mode  # "key" | "install" | "nosc"
        self.key = key  # bytes or None
        self.enforce = enforce
        self.silent = False
        self.baud = None  # None: hears frames at any line speed (see --pd baud=N)
        self.tamper = False
        self.sc = False
        self.online = False
        self.dev = None  # osdp.PeripheralDevice
        self.chan = None


def parse_pd_spec(spec):
    parts = spec.split(":")
    try:
        addr = int(parts[0], 0)
    except ValueError:
        raise ValueError(f"bad PD address in {spec!r}")
    if not 0 <= addr <= 126:
        raise ValueError(f"PD address out of range 0..126 in {spec!r}")
    mode, key, enforce, baud = "install", None, False, None
    for p in parts[1:]:
        pl = p.lower()
        if pl == "install":
            mode, key = "install", None
        elif pl == "nosc":
            mode, key = "nosc", None
        elif pl == "enforce":
            enforce = True
        elif pl.startswith("baud="):
            try:
                baud = int(pl[5:])
            except ValueError:
                raise ValueError(f"bad baud in {spec!r}")
            if baud not in (9600, 19200, 38400, 57600, 115200, 230400):
                raise ValueError(f"baud not a standard OSDP rate in {spec!r}")
        elif len(p) == 32:
            try:
                key = bytes.fromhex(p)
            except ValueError:
                raise ValueError(f"bad SCBK hex in {spec!r}")
            mode = "key"
        else:
            raise ValueError(f"bad PD option {p!r} in {spec!r}")
    if enforce and mode != "key":
        raise ValueError(f"enforce needs a 32-hex-char SCBK in {spec!r}")
    st = PdState(addr, mode, key, enforce)
    st.baud = baud
    return st


TCGETS2 = 0x802C542A  # _IOR('T', 0x2A, struct termios2), x86_64 and arm64


def line_speed(fd):
    """The tty's input speed as set by whoever opened it last (termios2 c_ispeed), or None."""
    try:
        raw = fcntl.ioctl(fd, TCGETS2, bytes(44))
        return struct.unpack("<IIIIB19sII", raw)[6]
    except OSError:
        return None


class Bus:
    def __init__(self, master_fd, pds):
        self.master = master_fd
        self.pds = pds  # list of PdState
        self.slave = None  # our fd of the pty's slave side (line speed, see --pd baud=N)
        self.lock = threading.RLock()  # guards every LibOSDP call and PD buffers
        self.stop = threading.Event()
        self.splitter = FrameSplitter()
        self.thread = threading.Thread(target=self._run, name="osdp-bus", daemon=True)

    # -- wire --
    def write_wire(self, data):
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                select.select([], [self.master], [], 0.05)
                continue
            except OSError as e:
                log(f"pty write failed: {e}")
                return
            view = view[n:]

    # -- PD setup --
    def setup_pd(self, st):
        st.chan = BusChannel(self, st)
        flags = [osdp.LibFlag.EnforceSecure] if st.enforce else []
        if st.mode == "key":
            scbk = st.key
        elif st.mode == "nosc":
            scbk = os.urandom(16)  # never used: SC is hidden from the CP (see rewrite_nosc_reply)
        else:
            scbk = None  # install mode
        info = osdp.PDInfo(
            st.addr,
            st.chan,
            scbk=scbk,
            name=f"pd-{st.addr}",
            flags=flags,
            id=osdp.PdId(1, 2, 0x0A1B2C, 0x47480000 + st.addr, 0x010203),
        )
        dev = osdp.PeripheralDevice(info, osdp.PDCapabilities(CAPS), log_level=LOG_LEVEL)
        # Replace the wrapper's queueing handler (its queue would grow forever) with ours.
        dev.ctx.set_command_callback(lambda cmd, st=st: self._on_command(st, cmd))
        if hasattr(dev.ctx, "set_event_completion_callback"):
            dev.ctx.set_event_completion_callback(
                lambda ev, status, st=st: self._on_event_done(st, ev, status)
            )
        st.dev = dev

    # -- LibOSDP callbacks (run inside refresh(), bus thread, lock held) --
    def _on_command(self, st, cmd):
        try:
            c = cmd.get("command")
            f = {k: jsonable(v) for k, v in cmd.items() if k != "command"}
            if c == osdp.Command.Output:
                emit("output", st.addr, **f)
            elif c == osdp.Command.LED:
                emit("led", st.addr, **f)
            elif c == osdp.Command.Buzzer:
                emit("buzzer", st.addr, **f)
            elif c == osdp.Command.Text:
                emit("text", st.addr, **f)
            elif c == osdp.Command.Keyset:
                key = cmd.get("data", b"")
                emit("keyset", st.addr, type=cmd.get("type"), key=bytes(key).hex())
                if len(key) == 16:
                    st.key = bytes(key)
                    if st.mode == "install":
                        st.mode = "key"
            elif c == osdp.Command.Comset:
                emit("comset", st.addr, address=cmd.get("address"), baud_rate=cmd.get("baud_rate"))
            elif c == osdp.Command.ComsetDone:
                emit(
                    "comset_done", st.addr, address=cmd.get("address"), baud_rate=cmd.get("baud_rate")
                )
                if isinstance(cmd.get("address"), int):
                    st.cur_addr = cmd["address"]
                if st.baud is not None and isinstance(cmd.get("baud_rate"), int):
                    st.baud = cmd["baud_rate"]
            elif c == osdp.Command.Manufacturer:
                emit("mfg", st.addr, **f)
            else:
                emit("command", st.addr, command=c, raw=repr(cmd))
        except Exception as e:  # never let an exception escape into C
            log(f"command callback error: {e!r}")
        # A fresh tuple on purpose: the 3.2.9 binding drops one reference to the tuple's second
        # item without owning it; a constant (0, None) would drain None's refcount.
        return tuple([0, None])

    def _on_event_done(self, st, ev, status):
        try:
            kind = EVENT_NAMES.get(ev.get("event"), str(ev.get("event")))
            data = ev.get("data", ev.get("report"))
            emit(
                "delivered",
                st.addr,
                event=kind,
                data=bytes(data).hex() if data is not None else None,
                status=int(status),
                ok=int(status) == 0,
            )
        except Exception as e:
            log(f"completion callback error: {e!r}")

    # -- the loop --
    def _refresh(self, st):
        st.dev.ctx.refresh()
        sc = bool(st.dev.ctx.is_sc_active())
        if sc != st.sc:
            st.sc = sc
            emit("sc", st.addr, active=sc, scbk_d=(st.mode == "install"))
        online = bool(st.dev.ctx.is_online())
        if online != st.online:
            st.online = online
            emit("online", st.addr, online=online)

    def _deliver(self, frames, speed=None):
        for mark, frame in frames:
            addr = frame[1]
            if addr & 0x80:
                continue  # a reply (someone else's) - PDs ignore these
            for st in self.pds:
                if st.silent or not (addr == 0x7F or addr == st.cur_addr):
                    continue
                if st.baud is not None and speed is not None and speed != st.baud:
                    continue  # sent at another rate: garbage to this PD
                st.chan.inbuf += (b"\xff" if mark else b"") + frame
                self._refresh(st)

    def _run(self):
        next_tick = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            timeout = max(0.0, min(0.010, next_tick - now))
            try:
                r, _, _ = select.select([self.master], [], [], timeout)
            except (OSError, ValueError):
                break
            data = b""
            if r:
                try:
                    data = os.read(self.master, 4096)
                except BlockingIOError:
                    data = b""
                except OSError as e:
                    log(f"pty read failed: {e}")
                    time.sleep(0.01)
            with self.lock:
                if data:
                    speed = None
                    if self.slave is not None and any(p.baud is not None for p in self.pds):
                        speed = line_speed(self.slave)
                    self._deliver(self.splitter.feed(data), speed)
                now = time.monotonic()
                self._deliver(self.splitter.expire(now))
                if now >= next_tick:
                    for st in self.pds:
                        self._refresh(st)
                    next_tick = now + 0.010

    # -- stdin ops (main thread) --
    def submit(self, st, event):
        with self.lock:
            ok = st.dev.ctx.submit_event(event)
        return bool(ok)


# ---------------------------------------------------------------------------------------------
# stdin ops
# ---------------------------------------------------------------------------------------------
KEY_OSDP = {"#": 0x0D, "*": 0x7F}


class OpError(Exception):
    pass


def h10301(facility, number):
    if not (0 <= facility <= 255 and 0 <= number <= 65535):
        raise OpError("facility must be 0..255 and number 0..65535")
    body = (facility << 16) | number  # 24 bits: bits 2..25
    hi = body >> 12  # bits 2..13
    lo = body & 0xFFF  # bits 14..25
    even = bin(hi).count("1") & 1  # makes bits 1..13 even
    odd = 1 - (bin(lo).count("1") & 1)  # makes bits 14..26 odd
    return (even << 25) | (body << 1) | odd


def get_int(obj, key, default=None, lo=None, hi=None):
    v = obj.get(key, default)
    if v is None:
        raise OpError(f'missing "{key}"')
    if isinstance(v, bool) or not isinstance(v, int):
        raise OpError(f'"{key}" must be an integer')
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise OpError(f'"{key}" out of range {lo}..{hi}')
    return v


def get_bool(obj, key, default=None):
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise OpError(f'"{key}" must be true or false')
    return v


class Controller:
    def __init__(self, bus, link):
        self.bus = bus
        self.link = link
        self.by_addr = {st.addr: st for st in bus.pds}

    def pd_of(self, req):
        a = req.get("pd")
        if isinstance(a, bool) or not isinstance(a, int) or a not in self.by_addr:
            raise OpError(f"unknown pd {a!r}")
        return self.by_addr[a]

    def handle(self, req):
        """Returns False on quit."""
        op = req.get("op")
        extra = {"id": req["id"]} if "id" in req else {}
        if op == "quit":
            return False
        if op == "state":
            pds = [
                {
                    "pd": st.addr,
                    "address": st.cur_addr,
                    "baud": st.baud,
                    "sc": st.sc,
                    "online": st.online,
                    "silent": st.silent,
                    "tamper": st.tamper,
                    "mode": st.mode,
                    "key": st.key.hex() if st.key and st.mode == "key" else None,
                }
                for st in self.bus.pds
            ]
            emit("state", None, pds=pds, **extra)
            return True
        st = self.pd_of(req)
        if op == "keys":
            self.op_keys(st, req, extra)
        elif op == "card":
            self.op_card(st, req, extra)
        elif op == "tamper":
            on = get_bool(req, "on")
            power = get_bool(req, "power", False)
            ev = {
                "event": osdp.Event.Status,
                "type": osdp.StatusReportType.Local,
                "report": bytes([1 if on else 0, 1 if power else 0]),
            }
            if not self.bus.submit(st, ev):
                raise OpError("LibOSDP refused the event (queue full?)")
            st.tamper = on
            emit("sent", st.addr, op="tamper", on=on, power=power, **extra)
        elif op == "silent":
            on = get_bool(req, "on")
            with self.bus.lock:
                st.silent = on
                st.chan.inbuf.clear()
            emit("ack", st.addr, op="silent", on=on, **extra)
        else:
            raise OpError(f"unknown op {op!r}")
        return True

    def op_keys(self, st, req, extra):
        reader = get_int(req, "reader", 0, 0, 255)
        if "hex" in req:
            try:
                keys = bytes.fromhex(req["hex"])
            except (TypeError, ValueError):
                raise OpError('"hex" must be a hex string')
        else:
            digits = req.get("digits")
            if not isinstance(digits, str):
                raise OpError('"digits" must be a string')
            enc = req.get("encoding", "osdp")
            if enc not in ("osdp", "ascii"):
                raise OpError('"encoding" must be "osdp" or "ascii"')
            try:
                keys = bytes(
                    KEY_OSDP.get(ch, ord(ch)) if enc == "osdp" else ord(ch) for ch in digits
                )
            except ValueError:
                raise OpError("keys must be ASCII characters")
        if not keys:
            raise OpError("no keys")
        each = get_bool(req, "each", False)
        gap = get_int(req, "gap_ms", 0, 0, 60000) / 1000.0
        chunks = [keys[i : i + 1] for i in range(len(keys))] if each else [keys]
        for n, chunk in enumerate(chunks):
            if n and gap:
                time.sleep(gap)
            ev = {"event": osdp.Event.KeyPress, "reader_no": reader, "data": chunk}
            if not self.bus.submit(st, ev):
                raise OpError(f"LibOSDP refused key event {n} (queue full?)")
        emit("sent", st.addr, op="keys", data=keys.hex(), events=len(chunks), **extra)

    def op_card(self, st, req, extra):
        reader = get_int(req, "reader", 0, 0, 255)
        fmt_name = req.get("format", "wiegand")
        if fmt_name not in ("wiegand", "raw"):
            raise OpError('"format" must be "wiegand" or "raw"')
        fmt = osdp.CardFormat.Wiegand if fmt_name == "wiegand" else osdp.CardFormat.Unspecified
        given = [k for k in ("hex", "value", "facility") if k in req]
        if len(given) != 1:
            raise OpError('give exactly one of "hex", "value", "facility"+"number"')
        if "facility" in req:
            bits = get_int(req, "bits", 26, 26, 26)
            value = h10301(get_int(req, "facility"), get_int(req, "number"))
        else:
            bits = get_int(req, "bits", None, 1, 512)
        nbytes = (bits + 7) // 8
        if "hex" in req:
            try:
                data = bytes.fromhex(req["hex"])
            except (TypeError, ValueError):
                raise OpError('"hex" must be a hex string')
            if len(data) != nbytes:
                raise OpError(f'"hex" must be {nbytes} bytes for {bits} bits')
        else:
            if "value" in req:
                value = get_int(req, "value", None, 0)
            if value >> bits:
                raise OpError(f"value does not fit in {bits} bits")
            data = (value << (nbytes * 8 - bits)).to_bytes(nbytes, "big")
        ev = {
            "event": osdp.Event.CardRead,
            "reader_no": reader,
            "direction": 0,
            "format": fmt,
            "length": bits,
            "data": data,
        }
        if not self.bus.submit(st, ev):
            raise OpError("LibOSDP refused the event (queue full?)")
        emit("sent", st.addr, op="card", bits=bits, hex=data.hex(), format=int(fmt), **extra)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
LOG_LEVELS = {
    "error": osdp.LogLevel.Error,
    "warning": osdp.LogLevel.Warning,
    "info": osdp.LogLevel.Info,
    "debug": osdp.LogLevel.Debug,
}
LOG_LEVEL = osdp.LogLevel.Warning


class _Stop(Exception):
    pass


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


def main():
    global LOG_LEVEL
    ap = argparse.ArgumentParser(description="OSDP PD bus peer (see file header)")
    ap.add_argument("--link", required=True)
    ap.add_argument("--pd", action="append", required=True, metavar="ADDR[:SCBK|:install|:nosc][:enforce][:baud=N]")
    ap.add_argument("--log-level", default="warning", choices=sorted(LOG_LEVELS))
    args = ap.parse_args()
    LOG_LEVEL = LOG_LEVELS[args.log_level]
    try:
        pds = [parse_pd_spec(s) for s in args.pd]
    except ValueError as e:
        ap.error(str(e))
    if len({p.addr for p in pds}) != len(pds):
        ap.error("duplicate PD address")

    try:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        slave_name = os.ttyname(slave)
        link = os.path.abspath(args.link)
        make_link(link, slave_name)
    except OSError as e:
        log(f"cannot set up pty/link: {e}")
        return 1

    bus = Bus(master, pds)
    bus.slave = slave
    for st in pds:
        bus.setup_pd(st)
    ctl = Controller(bus, link)

    def on_signal(signum, frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    bus.thread.start()
    emit("ready", None, link=link, tty=slave_name, pds=[p.addr for p in pds])
    try:
        stdin = sys.stdin.buffer
        while True:
            line = stdin.readline()
            if not line:
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
                if not ctl.handle(req):
                    break
            except OpError as e:
                extra = {"id": req["id"]} if "id" in req else {}
                pd = req.get("pd") if isinstance(req.get("pd"), int) else None
                emit("error", pd, msg=str(e), op=req.get("op"), **extra)
            except Exception as e:  # keep running whatever happens
                emit("error", None, msg=f"internal error: {e!r}", op=req.get("op"))
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bus.stop.set()
        bus.thread.join(1.0)
        remove_link(link, slave_name)
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stderr.flush()
    os._exit(rc)  # do not wait for anything else at interpreter shutdown
