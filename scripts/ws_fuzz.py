#!/usr/bin/env python3
"""WebSocket fuzzer for presence-service (run by scripts/fuzz.sh; needs the `websockets` package).

    ws_fuzz.py --base http://127.0.0.1:PORT --token JWT [--pid PID] [--seed N]
               [--sockets 50] [--messages 100]

Opens --sockets sockets to GET /api/v1/presence/ws (half with `Authorization: Bearer`, half
with the subprotocols `presence.v1, bearer.<jwt>`), each for a random user and device, and sends
--messages random messages on each: valid types with random and huge field values, unknown
types, random JSON shapes, truncated JSON, binary frames, invalid UTF-8 in text frames (raw
frames written below the library), frames over 64 KiB (the server closes with 1009), pings.
Some sockets are cut abruptly: raw TCP connections that send half a frame header, or half a
frame, and close. A socket the server closes is replaced by a new one until its budget is spent.

Then it checks that the server survived: the process is alive (--pid), /livez answers 200, and
a fresh well-behaved socket gets its `welcome` and a `reply` to a `heartbeat`. Prints the seed,
the messages sent, the replies and errors received and the close codes; exits 1 when the server
did not survive (a crash), 0 otherwise.
"""

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import socket
import struct
import sys
import time
import urllib.request

import websockets
from websockets.exceptions import ConnectionClosed

TYPES = ["heartbeat", "setStatus", "clearStatus", "subscribe", "unsubscribe", "query",
         "refresh", "resume"]
HUGE_INTS = [0, -1, 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 2**1000]
HUGE_FLOATS = [1e30, -1e30, 1.5, 1e308, -0.0, 3.14]


def rand_str(rng, n=None):
    n = rng.randint(0, 40) if n is None else n
    alphabet = "abcXYZ019_.:- \"\\/\t\n会议中\u0000\u200b\U0001F600"
    return "".join(rng.choice(alphabet) for _ in range(n))


def rand_scalar(rng):
    return rng.choice([
        lambda: rng.choice(HUGE_INTS),
        lambda: rng.choice(HUGE_FLOATS),
        lambda: rng.randint(1, 10**6),
        lambda: rand_str(rng),
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.choice(["ONLINE", "OFFLINE", "BUSY", "AWAY", "busy", ""]),
    ])()


def rand_json(rng, depth=0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rand_scalar(rng)
    if r < 0.75:
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {rand_str(rng, rng.randint(0, 8)): rand_json(rng, depth + 1)
            for _ in range(rng.randint(0, 6))}


def rand_ids(rng):
    k = rng.random()
    if k < 0.1:
        return [rng.randint(1, 10**6) for _ in range(rng.choice([1000, 1001, 5000, 5001]))]
    if k < 0.2:
        return rand_json(rng)
    return [rng.choice([rng.randint(1, 10**6)] * 3 + [rand_scalar(rng)])
            for _ in range(rng.randint(0, 20))]


def valid_type_message(rng):
    t = rng.choice(TYPES)
    m = {"type": t}
    if rng.random() < 0.7:
        m["id"] = rand_json(rng)
    if t == "heartbeat":
        m["active"] = rng.choice([True, False, rand_scalar(rng)])
    elif t == "setStatus":
        if rng.random() < 0.8:
            m["status"] = rand_scalar(rng)
        if rng.random() < 0.5:
            m["customText"] = rng.choice([rand_str(rng), "x" * rng.choice([100, 101, 5000]),
                                          rand_scalar(rng)])
        if rng.random() < 0.3:
            m["expiresAt"] = rng.choice(["2099-01-01T00:00:00Z", "2000-01-01T00:00:00Z",
                                         "tomorrow", rand_scalar(rng),
                                         "9999-12-31T23:59:59Z"])
    elif t in ("subscribe", "unsubscribe"):
        m["targets"] = rand_ids(rng)
    elif t == "query":
        m["userIds"] = rand_ids(rng)
    elif t == "refresh":
        m["token"] = rng.choice([rand_str(rng), "a.b.c", rand_scalar(rng), "e30.e30.sig"])
    elif t == "resume":
        if rng.random() < 0.1:
            m["versions"] = {str(i): i for i in range(rng.choice([10, 5002]))}
        else:
            m["versions"] = rng.choice([
                {str(rng.choice(HUGE_INTS)): rng.choice(HUGE_INTS)}, rand_json(rng),
                {rand_str(rng, 5): rand_scalar(rng)}])
    if rng.random() < 0.2:
        m[rand_str(rng, 6)] = rand_json(rng)
    return m


def refresh_is_fatal(m):
    # A refresh with a bad token closes the socket with 4401 (documented). Keep them rare.
    return isinstance(m, dict) and m.get("type") == "refresh"


def fuzz_message(rng):
    """(kind, payload): payload is str for a text frame, bytes for binary, None for a ping."""
    r = rng.random()
    if r < 0.45:
        m = valid_type_message(rng)
        if refresh_is_fatal(m) and rng.random() < 0.8:
            m = {"type": "heartbeat", "id": rand_json(rng)}
        return "valid-type", json.dumps(m, ensure_ascii=rng.random() < 0.5)
    if r < 0.55:
        m = {"type": rng.choice([rand_str(rng), rand_scalar(rng), "HEARTBEAT", "welcome",
                                 "presence", "reply", "error"])}
        m.update({rand_str(rng, 5): rand_json(rng) for _ in range(rng.randint(0, 3))})
        return "unknown-type", json.dumps(m)
    if r < 0.65:
        return "random-json", json.dumps(rand_json(rng))
    if r < 0.75:
        s = json.dumps(valid_type_message(rng))
        return "truncated-json", s[:rng.randint(0, max(0, len(s) - 1))]
    if r < 0.82:
        return "binary", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
    if r < 0.88:
        return "ping", None
    if r < 0.93:
        return "garbage-text", rand_str(rng, rng.randint(0, 200))
    if r < 0.97:
        return "near-limit", json.dumps({"type": "heartbeat", "id": "x" * rng.randint(60000, 65400)})
    return "oversized", json.dumps({"type": "query", "userIds": [1] * rng.randint(33000, 80000)})


def fuzz_subprotocol_or_header(i, token):
    if i % 2 == 0:
        return {"additional_headers": {"Authorization": f"Bearer {token}"}}
    return {"subprotocols": ["presence.v1", f"bearer.{token}"]}


class Stats:
    def __init__(self):
        self.sent = collections.Counter()
        self.received = collections.Counter()
        self.closes = collections.Counter()
        self.refused = collections.Counter()
        self.raw = collections.Counter()
        self.stuck = 0


async def drain(ws, stats, final):
    try:
        async for msg in ws:
            if isinstance(msg, bytes):
                stats.received["binary?"] += 1
                continue
            try:
                m = json.loads(msg)
                t = m.get("type", "?")
            except Exception:  # noqa: BLE001 - the server must send JSON; count it
                m, t = {}, "not-json"
            stats.received[t] += 1
            if t == "reply" and m.get("id") == "fz-final":
                final.set()
    except ConnectionClosed:
        pass


def ws_url(base, user, device, platform="WEB"):
    return (base.replace("http://", "ws://") +
            f"/api/v1/presence/ws?userId={user}&deviceId={device}&platform={platform}")


async def fuzz_socket(i, args, rng, stats):
    budget = args.messages
    attempt = 0
    while budget > 0 and attempt < 20:
        attempt += 1
        user = rng.randint(1, 10**6)
        url = ws_url(args.base, user, f"fz{i}-{attempt}")
        try:
            ws = await websockets.connect(url, max_size=None, open_timeout=10,
                                          ping_interval=None, close_timeout=2,
                                          **fuzz_subprotocol_or_header(i, args.token))
        except websockets.InvalidStatus as e:
            stats.refused[e.response.status_code] += 1
            await asyncio.sleep(0.05)
            continue
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as e:
            stats.refused[type(e).__name__] += 1
            await asyncio.sleep(0.05)
            continue
        final = asyncio.Event()
        reader = asyncio.create_task(drain(ws, stats, final))
        try:
            while budget > 0:
                kind, payload = fuzz_message(rng)
                budget -= 1
                if rng.random() < 0.04:
                    # Invalid UTF-8 in a text frame, written below the library (which would
                    # refuse to send it): the server must close with 1007, not crash.
                    kind = "invalid-utf8"
                    bad = rng.choice([b"\xff\xfe", b"{\"type\":\"heartbeat\xc3\x28\"}",
                                      b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
                    send_raw_text(ws, bad)
                elif payload is None:
                    await ws.ping(os.urandom(rng.randint(0, 125)))
                else:
                    await ws.send(payload)
                stats.sent[kind] += 1
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
            # Still open: the socket must still work after the fuzz.
            await ws.send(json.dumps({"type": "heartbeat", "id": "fz-final"}))
            stats.sent["final-heartbeat"] += 1
            waiter = asyncio.create_task(final.wait())
            await asyncio.wait({waiter, reader}, timeout=10,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if final.is_set():
                outcome = "open after the fuzz, answered a heartbeat, closed by us (1000)"
                await ws.close()
            elif reader.done():
                outcome = None  # closed by the server (a fatal frame sent last)
            else:
                outcome = "open after the fuzz, NO heartbeat reply in 10 s"
                stats.stuck += 1
                await ws.close()
        except ConnectionClosed:
            outcome = None
        try:
            await asyncio.wait_for(ws.wait_closed(), 5)
        except asyncio.TimeoutError:
            pass
        reader.cancel()
        if outcome is None:
            rcvd = ws.protocol.close_rcvd
            if rcvd is not None:
                outcome = f"closed by the server: {rcvd.code} {rcvd.reason}".rstrip()
            else:
                outcome = "dropped by the server without a close frame (1006)"
        stats.closes[outcome] += 1


def send_raw_text(ws, data):
    """Writes one masked text frame with the given (invalid UTF-8) payload on the socket."""
    from websockets.frames import Frame, Opcode
    frame = Frame(Opcode.TEXT, data)
    # The protocol object would validate UTF-8 on send; write the serialized frame ourselves.
    raw = frame.serialize(mask=True, extensions=[])
    # Bypassing the library also bypasses its check that the socket is still open: once the
    # server has closed it (for an earlier fatal frame), the transport refuses writes. Report
    # that as the library would, a ConnectionClosed, so the close is counted, not a crash.
    from websockets.protocol import State
    closed = ConnectionClosed(None, None)  # the close frames are read from ws.protocol later
    if ws.protocol.state is not State.OPEN or ws.transport.is_closing():
        raise closed
    try:
        ws.transport.write(raw)
    except RuntimeError as e:  # write() after write_eof(): closed between the check and here
        raise closed from e


def raw_handshake(host, port, token, user, device):
    key = base64.b64encode(os.urandom(16)).decode()
    req = (f"GET /api/v1/presence/ws?userId={user}&deviceId={device}&platform=WEB HTTP/1.1\r\n"
           f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
           f"Authorization: Bearer {token}\r\n\r\n")
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(req.encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return s, head.split(b"\r\n", 1)[0], rest


def masked_frame(opcode, payload, fin=True):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_abuse(args, rng, stats, n):
    """Abrupt closes mid-frame, bad opcodes, unmasked frames, lying lengths, fragments."""
    host, port = args.base.split("//", 1)[1].rsplit(":", 1)
    port = int(port)
    for j in range(n):
        try:
            s, status, _ = raw_handshake(host, port, args.token, rng.randint(1, 10**6), f"raw{j}")
        except OSError:
            stats.raw["connect-failed"] += 1
            continue
        if b" 101 " not in status:
            stats.raw[f"handshake {status.decode(errors='replace')}"] += 1
            s.close()
            continue
        full = masked_frame(0x1, json.dumps({"type": "heartbeat", "id": j}).encode())
        case = rng.choice(["half-header", "half-frame", "huge-length", "bad-opcode",
                           "unmasked", "fragment-no-end", "control-too-long",
                           "continuation-first", "reserved-bits", "close-bad-code"])
        try:
            if case == "half-header":
                s.sendall(full[:1])
            elif case == "half-frame":
                s.sendall(full[:len(full) // 2])
            elif case == "huge-length":
                s.sendall(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 2**63 - 1) + b"\0\0\0\0abc")
            elif case == "bad-opcode":
                s.sendall(masked_frame(rng.choice([0x3, 0x4, 0x5, 0xB, 0xF]), b"xx"))
            elif case == "unmasked":
                s.sendall(bytes([0x81, 2]) + b"{}")
            elif case == "fragment-no-end":
                s.sendall(masked_frame(0x1, b'{"type":', fin=False))
            elif case == "control-too-long":
                s.sendall(masked_frame(0x9, b"p" * 200))
            elif case == "continuation-first":
                s.sendall(masked_frame(0x0, b"abc"))
            elif case == "reserved-bits":
                f = bytearray(full)
                f[0] |= 0x70
                s.sendall(bytes(f))
            elif case == "close-bad-code":
                s.sendall(masked_frame(0x8, struct.pack("!H", rng.choice([0, 999, 1005, 1006, 5000]))
                                       + b"\xff"))
            if rng.random() < 0.5:
                time.sleep(0.01)
                try:
                    s.settimeout(0.5)
                    s.recv(4096)
                except OSError:
                    pass
        except OSError:
            pass
        finally:
            if rng.random() < 0.5:
                # RST instead of FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        stats.raw[case] += 1
        stats.sent["raw-frame"] += 1


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except Exception as e:  # noqa: BLE001
        return getattr(e, "code", str(e))


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False



async def error_of(check) -> str | None:
    """What the check coroutine `check` returned (a failure text or None), or the exception it raised."""
    try:
        return await check
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"

async def well_behaved(args):
    """A fresh socket gets `welcome`, and a `reply` with code 200 to a heartbeat."""
    url = ws_url(args.base, 424242, "fz-check")
    async with websockets.connect(url, open_timeout=10, ping_interval=None,
                                  additional_headers={"Authorization": f"Bearer {args.token}"}) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if welcome.get("type") != "welcome":
            return f"first message is not welcome: {welcome}"
        await ws.send(json.dumps({"type": "heartbeat", "id": "check", "active": True}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if m.get("type") == "reply" and m.get("id") == "check":
                if m.get("code") == 200 and "nextHeartbeatInterval" in (m.get("data") or {}):
                    return None
                return f"bad heartbeat reply: {m}"
        return "no heartbeat reply within 10 s"


def close_code_of(stream):
    """The code of the first Close frame in a stream of server (unmasked) frames, or None."""
    i = 0
    while i + 2 <= len(stream):
        op, n = stream[i] & 0x0F, stream[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = struct.unpack("!H", stream[i:i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack("!Q", stream[i:i + 8])[0], i + 8
        if op == 0x8:
            return struct.unpack("!H", stream[i:i + 2])[0] if n >= 2 else None
        i += n
    return None


async def close_codes(args):
    """The documented close codes of the fatal frames, one socket each: None when all match."""
    problems = []
    url = ws_url(args.base, 434343, "fz-codes")
    hdr = {"Authorization": f"Bearer {args.token}"}
    for what, want in (("over 64 KiB", 1009), ("invalid UTF-8", 1007)):
        async with websockets.connect(url, max_size=None, open_timeout=10, ping_interval=None,
                                      additional_headers=hdr) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # welcome
            if want == 1009:
                await ws.send("x" * 70000)
            else:
                send_raw_text(ws, b"\xff\xfe")
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except (ConnectionClosed, asyncio.TimeoutError):
                pass
            rcvd = ws.protocol.close_rcvd
            got = rcvd.code if rcvd is not None else None
            if got != want:
                problems.append(f"{what}: close code {got}, want {want}")
    host, port = args.base.split("//", 1)[1].rsplit(":", 1)
    for what, frame in (("unmasked frame", bytes([0x81, 2]) + b"{}"),
                        ("unknown opcode", masked_frame(0x3, b"xx"))):
        s, status, data = await asyncio.to_thread(raw_handshake, host, int(port), args.token,
                                                  434343, "fz-codes")
        try:
            s.sendall(frame)
            s.settimeout(5)
            while True:
                c = s.recv(65536)
                if not c:
                    break
                data += c
        except OSError:
            pass
        finally:
            s.close()
        got = close_code_of(data)
        if got != 1002:
            problems.append(f"{what}: close code {got}, want 1002")
    return "; ".join(problems) or None


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--pid", type=int)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--sockets", type=int, default=50)
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--raw", type=int, default=100, help="raw abusive TCP connections")
    p.add_argument("--concurrency", type=int, default=10)
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"ws-fuzz: seed {seed} ({args.sockets} sockets x {args.messages} messages, "
          f"{args.raw} raw connections; replay with --seed {seed})", flush=True)
    master = random.Random(seed)
    stats = Stats()
    started = time.monotonic()

    sem = asyncio.Semaphore(args.concurrency)

    async def one(i, r):
        async with sem:
            await fuzz_socket(i, args, r, stats)

    await asyncio.gather(*(one(i, random.Random(master.randrange(2**32)))
                           for i in range(args.sockets)))
    raw_rng = random.Random(master.randrange(2**32))
    await asyncio.to_thread(raw_abuse, args, raw_rng, stats, args.raw)

    elapsed = time.monotonic() - started
    total = sum(stats.sent.values())
    print(f"ws-fuzz: sent {total} messages in {elapsed:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(stats.sent.items())))
    print("ws-fuzz: received: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.received.items())))
    print("ws-fuzz: sockets:")
    for k, v in sorted(stats.closes.items(), key=str):
        print(f"ws-fuzz:   {v:4d}  {k}")
    if stats.refused:
        print("ws-fuzz: upgrades refused: " + ", ".join(f"{k}: {v}" for k, v in stats.refused.items()))
    print("ws-fuzz: raw connections: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.raw.items())))

    failures = []
    if stats.stuck:
        failures.append(f"{stats.stuck} sockets still open did not answer a heartbeat in 10 s")
    # Let the close grace and any pending work settle a moment, then probe.
    await asyncio.sleep(0.5)
    if args.pid is not None and not pid_alive(args.pid):
        failures.append(f"the node (pid {args.pid}) exited")
    live = http_status(args.base + "/livez")
    if live != 200:
        failures.append(f"/livez answered {live}")
    err = await error_of(well_behaved(args))
    if err:
        failures.append(f"a well-behaved socket: {err}")
    err = await error_of(close_codes(args))
    if err:
        failures.append(f"close codes: {err}")
    else:
        print("ws-fuzz: close codes as documented: 1009 over 64 KiB, 1007 invalid UTF-8, "
              "1002 unmasked frame and unknown opcode")
    if failures:
        for f in failures:
            print(f"ws-fuzz: FAIL {f}")
        return 1
    print(f"ws-fuzz: node alive, /livez 200, a fresh socket got welcome and a heartbeat reply")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
