/*
 * loadclient: a WebSocket load client for the sockdrawer benchmark.
 *
 * Opens N WebSocket connections to one server (raw HTTP upgrade, no
 * library), spread over channel paths "/<prefix><c>", then only reads.  It
 * parses server frames from one large read buffer (one read() per readable
 * socket, no per-frame syscall), answers pings with masked pongs and close
 * frames with a masked close, and checks each data frame's payload, written
 * by bench/publisher.c:
 *
 *     "SSSS QQQQQQQQQQQQ TTTTTTTTTTTTTTTT CCCCCCCC " + padding
 *      step  per-channel   CLOCK_MONOTONIC  channel
 *            sequence      ns at publish    index      (all lowercase hex)
 *
 * or, for publisher --payload json, the same header as the first JSON field,
 * at offset 8: {"seq":"SSSS QQQQ..." (a payload that starts with "{" must).
 *
 * permessage-deflate (RFC 7692), with --deflate: the handshake offers
 * "permessage-deflate; client_max_window_bits", and a 101 that does not
 * accept it with server_no_context_takeover fails the connection (reported
 * as failed_ext; so does a 101 that accepts an extension never offered).
 * Frames with RSV1 set are inflated (raw deflate, the payload followed by
 * 00 00 ff ff, a reset inflater per message) and the inflated payload is
 * checked as a plain one.  A fan-out sends the same compressed bytes to
 * every socket of a channel, so up to 16,384 distinct compressed payloads
 * are kept (in slots chosen by a hash of their bytes, compared byte for
 * byte, never by hash alone) with what they inflated to, and each distinct
 * payload is inflated about once: the same checks, without the load
 * client's core becoming the limit (--inflate-cache 0 inflates every
 * frame).  Byte counts: "bytes" is payload bytes (inflated),
 * "wire_bytes" frame headers + payloads as received (compressed).
 *
 * sockdrawer.v1 (--v1, docs/protocol.rst): every connection opens "/" offering
 * "Sec-WebSocket-Protocol: sockdrawer.v1" (a 101 that does not select it
 * fails the connection, counted as failed_ext), sends a masked
 * {"op":"subscribe","channel":"<prefix><c>"} and counts as open once
 * {"op":"subscribed",...} arrives.  Each {"op":"message",...,"data":"..."}
 * envelope's data string is checked as a plain payload (for JSON payloads,
 * data is the escaped JSON text: {\"seq\":\"SSSS ...); an {"op":"error"}
 * is a bad payload; other control messages are counted apart ("controls").
 *
 * Per connection it tracks the next expected sequence number of the current
 * step and a 64-message window behind it, counting losses (gaps),
 * duplicates and late (reordered) frames; frames of an older step (stragglers
 * of a step the server fell behind on) are counted apart as "stale".  Latency (now - publish time,
 * read once per read() call) goes into a log-scale histogram with 16
 * sub-buckets per power of two (at most 6% wide).
 *
 * Reading: by default the client blocks in epoll_wait, so every write the
 * server makes to an idle client wakes it (on a VM, an inter-processor
 * interrupt paid by the server).  With --poll-us N it sleeps in ticks of N
 * microseconds and polls epoll without blocking, as a remote client would
 * cost the server no wake-up; latency gains up to N microseconds.
 *
 * Output: JSON lines on stdout.  One "connected" line when every connection
 * is open or has failed, then one line per command read on stdin:
 *     r   report the counters since the last "r" and reset them
 *     p   peek: cumulative frame count only (cheap, no reset)
 *     q   final report, close everything, exit (also on EOF, SIGTERM, SIGINT)
 *
 * Build: gcc -O2 -o loadclient loadclient.c -lz      (libc and zlib)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define RBUF_SIZE (1 << 20)
#define HIST_N 1024
#define MAX_EVENTS 1024
#define HDR_LEN 44
#define MAX_ATTEMPTS 5
#define HS_BUF 2048
#define JSON_AT 8               /* the header's offset in a JSON payload: {"seq":" */
#define HEAD_MAX (JSON_AT + HDR_LEN)
#define IBUF_SIZE (1 << 20)     /* the largest inflated message */
#define ICACHE_N 16384         /* distinct compressed payloads kept: more than one full read of frames */

enum { ST_IDLE, ST_CONNECTING, ST_HANDSHAKE, ST_SUBSCRIBING, ST_OPEN, ST_CLOSED, ST_FAILED };

typedef struct {
    int fd;
    uint8_t state;
    uint8_t attempts;
    uint8_t in_frag;       /* inside a fragmented data message */
    uint8_t deflate;       /* permessage-deflate negotiated */
    uint32_t chan;         /* channel index */
    uint32_t step;         /* publisher step of the sequence being tracked */
    uint64_t next;         /* next expected sequence number */
    uint64_t win;          /* bit i: seq next-1-i was received */
    uint64_t t_start;      /* ns, connect() of the current attempt */
    uint64_t step_frames;  /* data frames since the last report */
    uint32_t left_len, left_cap;
    unsigned char *left;   /* unparsed tail (handshake or partial frame) */
} conn_t;

typedef struct {
    uint64_t frames, bytes, lost, dup, late, stale, wrong_chan, bad_payload, fragments;
    uint64_t wire_bytes, deflated, inflates, inflate_errors;
    uint64_t pings, closes, reads, controls;
    uint64_t lat_min, lat_max, lat_sum;
    uint64_t hist[HIST_N];
} stats_t;

static conn_t *conns;
static int nconns;
static const char *host = "127.0.0.1";
static int port;
static uint32_t offset, nchannels = 1;
static const char *prefix = "bench";
static int concurrency = 64;
static double max_seconds = 3600;
static int client_id;
static int poll_us;  /* 0: block in epoll_wait; else poll every poll_us microseconds */
static int epfd;
static unsigned char *rbuf;
static stats_t st, tot;  /* per step, cumulative */
static volatile sig_atomic_t stop_flag;
static uint64_t t_begin, t_connected;
static int n_open, n_failed, n_closed, in_flight, next_to_start;
static uint64_t hs_hist[HIST_N];
static uint64_t hs_max;
static int fail_status[6];  /* 0 refused/reset, 1 timeout, 2 http non-101, 3 other, 4 extension */
static char last_http_status[192];
static uint32_t mask_seed = 0x9e3779b9u;
static int want_deflate;       /* --deflate */
static int v1;                 /* --v1: the sockdrawer.v1 subprotocol */
static int sse;                /* --sse: Server-Sent Events streams (GET with Accept: text/event-stream) */
static int inflate_cache = 1;  /* --inflate-cache */
static z_stream zs;
static unsigned char *ibuf;

/* compressed payload -> what it inflated to (its length and first bytes) */
typedef struct {
    unsigned char *comp;
    uint32_t clen, cap;
    uint64_t plen;
    uint32_t hlen;
    unsigned char head[HEAD_MAX];
} icache_t;
static icache_t icache[ICACHE_N];

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static double sys_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static inline int hist_index(uint64_t v) {
    if (v < 16) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    return (msb - 3) * 16 + (int)((v >> (msb - 4)) & 15);
}

static inline uint64_t hist_low(int idx) {
    if (idx < 16) return (uint64_t)idx;
    int msb = idx / 16 + 3, sub = idx % 16;
    return (uint64_t)(16 + sub) << (msb - 4);
}

static uint64_t hist_quantile(const uint64_t *h, double q) {
    uint64_t total = 0;
    for (int i = 0; i < HIST_N; i++) total += h[i];
    if (!total) return 0;
    uint64_t want = (uint64_t)(q * (double)total);
    if (want >= total) want = total - 1;
    uint64_t acc = 0;
    for (int i = 0; i < HIST_N; i++) {
        acc += h[i];
        if (acc > want) return (hist_low(i) + hist_low(i + 1)) / 2;
    }
    return 0;
}

/*
 * Hex digits to a number, 8 at a time (SWAR).  Digits are lowercase
 * [0-9a-f]; a byte outside that set sets *bad.
 */
static inline uint64_t hex8(const unsigned char *p, int *bad) {
    uint64_t v;
    memcpy(&v, p, 8);
    /* valid: 0x30-0x39 or 0x61-0x66 */
    uint64_t hi = v & 0xF0F0F0F0F0F0F0F0ull;
    uint64_t is_digit = hi ^ 0x3030303030303030ull;  /* 0 lanes where high nibble is 3 */
    uint64_t is_alpha = hi ^ 0x6060606060606060ull;
    uint64_t lo = v & 0x0F0F0F0F0F0F0F0Full;
    /* per lane: digit lanes need lo <= 9, alpha lanes 1 <= lo <= 6 */
    uint64_t digit_lane = ~(((is_digit & 0x7F7F7F7F7F7F7F7Full) + 0x7F7F7F7F7F7F7F7Full) | is_digit) & 0x8080808080808080ull;
    uint64_t alpha_lane = ~(((is_alpha & 0x7F7F7F7F7F7F7F7Full) + 0x7F7F7F7F7F7F7F7Full) | is_alpha) & 0x8080808080808080ull;
    uint64_t digit_ok = digit_lane & ~((lo + 0x7676767676767676ull) & 0x8080808080808080ull);     /* lo <= 9 */
    uint64_t alpha_ok = alpha_lane & ~((lo + 0x7979797979797979ull) & 0x8080808080808080ull)      /* lo <= 6 */
                        & ((lo + 0x7F7F7F7F7F7F7F7Full) & 0x8080808080808080ull);                /* lo >= 1 */
    if ((digit_ok | alpha_ok) != 0x8080808080808080ull) *bad = 1;
    uint64_t d = lo + 9 * ((v >> 6) & 0x0101010101010101ull);
    d = ((d & 0x000F000F000F000Full) << 4) | ((d >> 8) & 0x000F000F000F000Full);
    d = ((d & 0x000000FF000000FFull) << 8) | ((d >> 16) & 0x000000FF000000FFull);
    d = ((d & 0x000000000000FFFFull) << 16) | ((d >> 32) & 0x000000000000FFFFull);
    return d;
}

static inline uint64_t hex4(const unsigned char *p, int *bad) {
    uint32_t x;
    memcpy(&x, p, 4);
    uint64_t v = 0x30303030ull | ((uint64_t)x << 32);  /* "0000" + p[0..3] */
    return hex8((const unsigned char *)&v, bad);
}

static void ep_mod(conn_t *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void conn_close(conn_t *c, int new_state) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    free(c->left);
    c->left = NULL;
    c->left_len = c->left_cap = 0;
    if (c->state == ST_OPEN) n_open--;
    c->state = (uint8_t)new_state;
}

static void start_connect(conn_t *c);

static void handshake_failed(conn_t *c, int why) {
    int was_hs = (c->state == ST_CONNECTING || c->state == ST_HANDSHAKE || c->state == ST_SUBSCRIBING);
    conn_close(c, ST_IDLE);
    if (was_hs) in_flight--;
    if (why != 2 && why != 4 && c->attempts < MAX_ATTEMPTS) {
        start_connect(c);
        return;
    }
    fail_status[why]++;
    c->state = ST_FAILED;
    n_failed++;
}

static void start_connect(conn_t *c) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("socket");
        fail_status[3]++;
        c->state = ST_FAILED;
        n_failed++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->attempts++;
    c->t_start = now_ns();
    c->state = ST_CONNECTING;
    in_flight++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        handshake_failed(c, 0);
    }
}

static void start_more(void) {
    while (in_flight < concurrency && next_to_start < nconns) {
        start_connect(&conns[next_to_start++]);
    }
}

static void send_handshake(conn_t *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        handshake_failed(c, 0);
        return;
    }
    char req[512], path[128];
    if (v1)
        snprintf(path, sizeof path, "/");
    else
        snprintf(path, sizeof path, "/%s%u", prefix, c->chan);
    int n = sse ? snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n\r\n",
                           path, host, port) :
            snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\n"
                     "Host: %s:%d\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "%s%s"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     path, host, port,
                     want_deflate ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" : "",
                     v1 ? "Sec-WebSocket-Protocol: sockdrawer.v1\r\n" : "");
    ssize_t w = write(c->fd, req, (size_t)n);
    if (w != n) {
        handshake_failed(c, 0);
        return;
    }
    c->state = ST_HANDSHAKE;
    ep_mod(c, EPOLLIN);
}

/* Send a small masked text frame (a v1 request, under 126 bytes); best effort. */
static void send_text(conn_t *c, const char *text) {
    size_t len = strlen(text);
    unsigned char f[2 + 4 + 125];
    if (len > 125) len = 125;
    f[0] = 0x81;
    f[1] = (unsigned char)(0x80 | len);
    mask_seed = mask_seed * 1664525u + 1013904223u;
    memcpy(f + 2, &mask_seed, 4);
    for (size_t i = 0; i < len; i++) f[6 + i] = (unsigned char)text[i] ^ f[2 + (i & 3)];
    ssize_t w = write(c->fd, f, 6 + len);
    (void)w;
}

/* Send a small masked control frame (pong/close); best effort. */
static void send_control(conn_t *c, int opcode, const unsigned char *payload, size_t len) {
    unsigned char f[2 + 4 + 125];
    if (len > 125) len = 125;
    f[0] = (unsigned char)(0x80 | opcode);
    f[1] = (unsigned char)(0x80 | len);
    mask_seed = mask_seed * 1664525u + 1013904223u;
    memcpy(f + 2, &mask_seed, 4);
    for (size_t i = 0; i < len; i++) f[6 + i] = payload[i] ^ f[2 + (i & 3)];
    ssize_t w = write(c->fd, f, 6 + len);
    (void)w;
}

/*
 * One data message: p holds (at least) its first HEAD_MAX bytes, len is its
 * whole (inflated) payload length, wire the bytes it took on the wire.
 */
static inline void count_data(conn_t *c, const unsigned char *p, uint64_t len, uint64_t wire, uint64_t now) {
    uint64_t plen = len;  /* counted as payload bytes: the whole message */
    if (len && p[0] == '{') {  /* publisher --payload json: the header is the "seq" string */
        if (len < JSON_AT + HDR_LEN || memcmp(p, "{\"seq\":\"", JSON_AT) != 0) {
            len = 0;  /* bad */
        } else {
            p += JSON_AT;
            len -= JSON_AT;
        }
    }
    if (len < HDR_LEN || p[4] != ' ' || p[17] != ' ' || p[34] != ' ' || p[43] != ' ') {
        st.frames++;
        st.bytes += plen;
        st.wire_bytes += wire;
        c->step_frames++;
        st.bad_payload++;
        return;
    }
    int bad = 0;
    uint32_t step = (uint32_t)hex4(p, &bad);
    uint64_t seq = (hex8(p + 5, &bad) << 16) | hex4(p + 13, &bad);
    uint64_t ts = (hex8(p + 18, &bad) << 32) | hex8(p + 26, &bad);
    uint32_t chan = (uint32_t)hex8(p + 35, &bad);
    if (!bad && step < c->step) {  /* a straggler of an older step: not this step's delivery */
        st.stale++;
        return;
    }
    st.frames++;
    st.bytes += plen;
    st.wire_bytes += wire;
    c->step_frames++;
    if (bad) {
        st.bad_payload++;
        return;
    }
    if (chan != c->chan) st.wrong_chan++;
    uint64_t lat = now > ts ? now - ts : 0;
    st.hist[hist_index(lat)]++;
    st.lat_sum += lat;
    if (lat > st.lat_max) st.lat_max = lat;
    if (lat < st.lat_min) st.lat_min = lat;
    if (step != c->step) {  /* first frame of a new step */
        c->step = step;
        c->next = 0;
        c->win = 0;
    }
    if (seq == c->next) {
        c->win = (c->win << 1) | 1;
        c->next++;
    } else if (seq > c->next) {
        uint64_t gap = seq - c->next;
        st.lost += gap;
        c->win = gap + 1 >= 64 ? 1 : ((c->win << (gap + 1)) | 1);
        c->next = seq + 1;
    } else {
        uint64_t d = c->next - 1 - seq;
        if (d < 64 && (c->win >> d) & 1) {
            st.dup++;
        } else {
            if (d < 64) c->win |= 1ull << d;
            st.late++;
            if (st.lost) st.lost--;  /* it was counted as a gap */
        }
    }
}

/*
 * Inflate one compressed message on its own (server_no_context_takeover):
 * fills head with its first bytes, *hlen with how many, *plen with its
 * length.  0 on success, -1 if it is not valid deflate data or inflates to
 * more than IBUF_SIZE.
 */
static int inflate_message(const unsigned char *in, uint64_t len, unsigned char *head, uint32_t *hlen,
                           uint64_t *plen) {
    static unsigned char tail[4] = {0x00, 0x00, 0xff, 0xff};
    st.inflates++;
    if (inflateReset(&zs) != Z_OK) return -1;
    zs.next_in = (unsigned char *)in;
    zs.avail_in = (uInt)len;
    zs.next_out = ibuf;
    zs.avail_out = IBUF_SIZE;
    int ret = len ? inflate(&zs, Z_SYNC_FLUSH) : Z_OK;
    if (ret == Z_OK && zs.avail_in == 0 && zs.avail_out) {  /* RFC 7692 7.2.2: append the stripped tail */
        zs.next_in = tail;
        zs.avail_in = sizeof tail;
        ret = inflate(&zs, Z_SYNC_FLUSH);
    }
    /* done: the tail consumed (or a final block, after which nothing counts) and room left */
    int ok = (ret == Z_STREAM_END || ((ret == Z_OK || ret == Z_BUF_ERROR) && zs.avail_in == 0)) && zs.avail_out;
    if (!ok) return -1;
    *plen = IBUF_SIZE - zs.avail_out;
    *hlen = (uint32_t)(*plen < HEAD_MAX ? *plen : HEAD_MAX);
    memcpy(head, ibuf, *hlen);
    return 0;
}

/*
 * A hash of the whole compressed payload: messages of one kind share their
 * first bytes (the block's Huffman tables) and their last, so a hash of a
 * few bytes would put them all in a few slots.
 */
static inline uint64_t icache_key(const unsigned char *p, uint64_t len) {
    uint64_t h = len * 0x9e3779b97f4a7c15ull, w;
    uint64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    for (; i < len; i++) h = (h ^ p[i]) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

/* A compressed data message: inflate it (or find it inflated before) and count it. */
static void count_deflated(conn_t *c, const unsigned char *p, uint64_t len, uint64_t wire, uint64_t now) {
    st.deflated++;
    icache_t *e = &icache[icache_key(p, len) % ICACHE_N];
    if (inflate_cache && e->comp && e->clen == len && memcmp(e->comp, p, len) == 0) {
        count_data(c, e->head, e->plen, wire, now);
        return;
    }
    unsigned char head[HEAD_MAX];
    uint32_t hlen;
    uint64_t plen;
    if (inflate_message(p, len, head, &hlen, &plen) < 0) {
        st.inflate_errors++;
        st.frames++;
        st.wire_bytes += wire;
        c->step_frames++;
        st.bad_payload++;
        return;
    }
    if (inflate_cache && len <= UINT32_MAX) {
        if (e->cap < len) {
            free(e->comp);
            e->cap = (uint32_t)(len < 512 ? 512 : len);
            e->comp = malloc(e->cap);
        }
        memcpy(e->comp, p, len);
        e->clen = (uint32_t)len;
        e->plen = plen;
        e->hlen = hlen;
        memcpy(e->head, head, hlen);
    }
    count_data(c, head, plen, wire, now);
}

static void connection_open(conn_t *c, uint64_t now);

/* A sockdrawer.v1 text message: an envelope (checked), "subscribed", an error, or another control message. */
static void count_v1(conn_t *c, const unsigned char *p, uint64_t len, uint64_t wire, uint64_t now) {
    static const char msg[] = "{\"op\":\"message\"", sub[] = "{\"op\":\"subscribed\"", err[] = "{\"op\":\"error\"";
    static const char data_key[] = "\"data\":\"", json_seq[] = "{\\\"seq\\\":\\\"";
    if (len >= sizeof msg - 1 && memcmp(p, msg, sizeof msg - 1) == 0) {
        const unsigned char *d = memmem(p, (size_t)len, data_key, sizeof data_key - 1);
        if (!d) {
            count_data(c, p, 0, wire, now);  /* bad */
            return;
        }
        d += sizeof data_key - 1;
        uint64_t dlen = len - (uint64_t)(d - p);
        if (dlen >= sizeof json_seq - 1 && memcmp(d, json_seq, sizeof json_seq - 1) == 0) {
            d += sizeof json_seq - 1;  /* JSON text as a JSON string: the header follows {\"seq\":\" */
            dlen -= sizeof json_seq - 1;
        }
        count_data(c, d, dlen, wire, now);
        st.bytes += len - dlen;  /* count the whole envelope as payload bytes */
        return;
    }
    st.controls++;
    st.wire_bytes += wire;
    if (len >= sizeof sub - 1 && memcmp(p, sub, sizeof sub - 1) == 0) {
        if (c->state == ST_SUBSCRIBING) connection_open(c, now);
    } else if (len >= sizeof err - 1 && memcmp(p, err, sizeof err - 1) == 0) {
        st.bad_payload++;
        fprintf(stderr, "loadclient %d: %.*s\n", client_id, (int)(len < 200 ? len : 200), (const char *)p);
    }
}

/* Parse frames in buf[0..len); keep the incomplete tail in c->left. */
/* Keep the unparsed tail of a read (a partial frame or event) for the next one. */
static void keep_tail(conn_t *c, const unsigned char *tail, size_t rest) {
    if (rest) {
        if (c->left_cap < rest) {
            free(c->left);
            c->left_cap = (uint32_t)(rest < 256 ? 256 : rest);
            c->left = malloc(c->left_cap);
        }
        memmove(c->left, tail, rest);
    }
    c->left_len = (uint32_t)rest;
}

static void parse_frames(conn_t *c, unsigned char *buf, size_t len, uint64_t now) {
    size_t pos = 0;
    while (len - pos >= 2) {
        unsigned char b0 = buf[pos], b1 = buf[pos + 1];
        size_t hl = 2;
        uint64_t plen = b1 & 0x7f;
        if (plen == 126) {
            if (len - pos < 4) break;
            plen = ((uint64_t)buf[pos + 2] << 8) | buf[pos + 3];
            hl = 4;
        } else if (plen == 127) {
            if (len - pos < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = (plen << 8) | buf[pos + 2 + i];
            hl = 10;
        }
        int masked = b1 & 0x80;
        if (masked) hl += 4;
        if (len - pos < hl + plen) {
            if (hl + plen > (uint64_t)RBUF_SIZE / 2) {  /* would never fit */
                fprintf(stderr, "loadclient: frame of %llu bytes too large\n", (unsigned long long)plen);
                conn_close(c, ST_CLOSED);
                n_closed++;
                return;
            }
            break;
        }
        unsigned char *p = buf + pos + hl;
        if (masked) {  /* servers must not mask; unmask anyway */
            unsigned char *m = buf + pos + hl - 4;
            for (uint64_t i = 0; i < plen; i++) p[i] ^= m[i & 3];
            st.bad_payload++;
        }
        int op = b0 & 0x0f;
        int rsv = b0 & 0x70;
        if (rsv && !(rsv == 0x40 && c->deflate && (op == 0x1 || op == 0x2))) {
            /* RSV1 only on the first frame of a data message, only with permessage-deflate; never RSV2/3 */
            st.bad_payload++;
            rsv = 0;
            if (op == 0x1 || op == 0x2 || op == 0x0) {
                st.frames++;
                st.wire_bytes += hl + plen;
                c->step_frames++;
                pos += hl + plen;
                continue;
            }
        }
        switch (op) {
        case 0x1:
        case 0x2:
            c->in_frag = !(b0 & 0x80);
            if (v1 && !rsv && op == 0x1) {
                count_v1(c, p, plen, hl + plen, now);
            } else if (!rsv) {
                count_data(c, p, plen, hl + plen, now);
            } else if (c->in_frag) {  /* a fragmented compressed message: never sent by the servers measured */
                st.deflated++;
                st.frames++;
                st.wire_bytes += hl + plen;
                c->step_frames++;
                st.bad_payload++;
            } else {
                count_deflated(c, p, plen, hl + plen, now);
            }
            break;
        case 0x0:
            st.fragments++;
            st.wire_bytes += hl + plen;
            if (b0 & 0x80) c->in_frag = 0;
            break;
        case 0x9:
            st.pings++;
            send_control(c, 0xA, p, (size_t)plen);
            break;
        case 0xA:
            break;
        case 0x8:
            if (c->state == ST_SUBSCRIBING) {  /* closed before "subscribed": a failed handshake */
                handshake_failed(c, 2);
                return;
            }
            st.closes++;
            send_control(c, 0x8, p, plen >= 2 ? 2 : 0);
            if (plen >= 2) fprintf(stderr, "loadclient %d: close code %d from server\n", client_id, (p[0] << 8) | p[1]);
            conn_close(c, ST_CLOSED);
            n_closed++;
            return;
        default:
            st.bad_payload++;
        }
        pos += hl + plen;
    }
    size_t rest = len - pos;
    keep_tail(c, buf + pos, rest);
}

/*
 * Server-Sent Events (--sse): each event ends with a blank line; a "data: "
 * event is one message (the publisher's payloads are one line), anything
 * else (the retry hint, heartbeat comments) a control.
 */
static void parse_sse(conn_t *c, unsigned char *buf, size_t len, uint64_t now) {
    size_t pos = 0;
    for (;;) {
        unsigned char *e = buf + pos;
        unsigned char *end = memmem(e, len - pos, "\n\n", 2);
        if (!end) break;
        size_t elen = (size_t)(end - e) + 2;
        if (elen > 8 && memcmp(e, "data: ", 6) == 0) {
            count_data(c, e + 6, elen - 8, elen, now);
        } else {
            st.controls++;
            st.wire_bytes += elen;
        }
        pos += elen;
    }
    size_t rest = len - pos;
    if (rest > (size_t)RBUF_SIZE / 2) {
        fprintf(stderr, "loadclient: event of over %zu bytes\n", rest);
        conn_close(c, ST_CLOSED);
        n_closed++;
        return;
    }
    keep_tail(c, buf + pos, rest);
}

/* The value of header `name` (lowercase, with the colon) in a response head, or NULL. */
static const char *find_header(const unsigned char *buf, size_t len, const char *name, size_t *vlen) {
    size_t nl = strlen(name);
    const unsigned char *line = memmem(buf, len, "\r\n", 2), *stop = buf + len;
    while (line && line + 2 < stop) {
        line += 2;
        const unsigned char *eol = memmem(line, (size_t)(stop - line), "\r\n", 2);
        if (!eol) eol = stop;
        if ((size_t)(eol - line) >= nl && strncasecmp((const char *)line, name, nl) == 0) {
            const unsigned char *v = line + nl;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            *vlen = (size_t)(eol - v);
            return (const char *)v;
        }
        line = eol < stop ? eol : NULL;
    }
    return NULL;
}

/*
 * The 101's Sec-WebSocket-Extensions: with --deflate it must accept
 * permessage-deflate with server_no_context_takeover (this client inflates
 * each message on its own); without, there must be none.  0 if acceptable.
 */
static int check_extensions(conn_t *c, const unsigned char *head, size_t len) {
    size_t vlen = 0;
    const char *v = find_header(head, len, "sec-websocket-extensions:", &vlen);
    char val[256];
    if (vlen >= sizeof val) vlen = sizeof val - 1;
    if (v) memcpy(val, v, vlen);
    val[v ? vlen : 0] = 0;
    const char *why = NULL;
    if (!want_deflate) {
        if (v) why = "101 with an extension never offered";
    } else if (!v || !strcasestr(val, "permessage-deflate")) {
        why = "101 without permessage-deflate";
    } else if (!strcasestr(val, "server_no_context_takeover")) {
        why = "101 without server_no_context_takeover";
    }
    if (!why && v1) {
        size_t plen = 0;
        const char *proto = find_header(head, len, "sec-websocket-protocol:", &plen);
        if (!proto || plen != 13 || strncmp(proto, "sockdrawer.v1", 13) != 0) why = "101 without sockdrawer.v1";
    }
    if (why) {
        snprintf(last_http_status, sizeof last_http_status, "%s%s%s", why, v ? ": " : "", val);
        for (char *q = last_http_status; *q; q++)  /* it goes into a JSON string */
            if (*q == '"' || *q == '\\' || (unsigned char)*q < 0x20) *q = '\'';
        return -1;
    }
    c->deflate = (uint8_t)(v != NULL);
    return 0;
}

static void on_readable(conn_t *c) {
    size_t have = c->left_len;
    if (have) memcpy(rbuf, c->left, have);
    ssize_t n = read(c->fd, rbuf + have, RBUF_SIZE - have);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (c->state == ST_OPEN) {
            conn_close(c, ST_CLOSED);
            n_closed++;
        } else {
            handshake_failed(c, 0);
        }
        return;
    }
    uint64_t now = now_ns();
    st.reads++;
    size_t len = have + (size_t)n;
    if (c->state == ST_HANDSHAKE) {
        unsigned char *end = memmem(rbuf, len, "\r\n\r\n", 4);
        if (!end) {
            if (len > HS_BUF) {
                handshake_failed(c, 2);
                return;
            }
            if (c->left_cap < len) {
                free(c->left);
                c->left_cap = HS_BUF + 1;
                c->left = malloc(c->left_cap);
            }
            memcpy(c->left, rbuf, len);
            c->left_len = (uint32_t)len;
            return;
        }
        if (len < 12 || memcmp(rbuf, sse ? "HTTP/1.1 200" : "HTTP/1.1 101", 12) != 0) {
            size_t l = 0;
            while (l < len && l < sizeof last_http_status - 1 && rbuf[l] != '\r') l++;
            memcpy(last_http_status, rbuf, l);
            last_http_status[l] = 0;
            handshake_failed(c, 2);
            return;
        }
        if (sse) {
            c->left_len = 0;
            connection_open(c, now);
            size_t hdr = (size_t)(end + 4 - rbuf);
            if (len > hdr) parse_sse(c, rbuf + hdr, len - hdr, now);
            return;
        }
        if (check_extensions(c, rbuf, (size_t)(end - rbuf)) < 0) {
            handshake_failed(c, 4);
            return;
        }
        c->left_len = 0;
        if (v1) {
            char sub[128];
            snprintf(sub, sizeof sub, "{\"op\":\"subscribe\",\"channel\":\"%s%u\"}", prefix, c->chan);
            send_text(c, sub);
            c->state = ST_SUBSCRIBING;
        } else {
            connection_open(c, now);
        }
        size_t hdr = (size_t)(end + 4 - rbuf);
        if (len > hdr) parse_frames(c, rbuf + hdr, len - hdr, now);
        return;
    }
    if (sse)
        parse_sse(c, rbuf, len, now);
    else
        parse_frames(c, rbuf, len, now);
}

/* The handshake is done (raw: the 101; v1: "subscribed"): the connection counts as open. */
static void connection_open(conn_t *c, uint64_t now) {
    uint64_t dt = now - c->t_start;
    hs_hist[hist_index(dt)]++;
    if (dt > hs_max) hs_max = dt;
    c->state = ST_OPEN;
    n_open++;
    in_flight--;
}

static void check_handshake_timeouts(uint64_t now) {
    for (int i = 0; i < next_to_start; i++) {
        conn_t *c = &conns[i];
        if ((c->state == ST_CONNECTING || c->state == ST_HANDSHAKE || c->state == ST_SUBSCRIBING)
            && now - c->t_start > 10000000000ull)
            handshake_failed(c, 1);
    }
}

static void print_hist(const uint64_t *h) {
    int first = 1;
    putchar('[');
    for (int i = 0; i < HIST_N; i++) {
        if (!h[i]) continue;
        printf("%s[%d,%llu]", first ? "" : ",", i, (unsigned long long)h[i]);
        first = 0;
    }
    putchar(']');
}

static void report(const char *event, stats_t *s) {
    uint64_t fmin = UINT64_MAX, fmax = 0;
    int nopen = 0;
    for (int i = 0; i < nconns; i++) {
        if (conns[i].state != ST_OPEN) continue;
        nopen++;
        if (conns[i].step_frames < fmin) fmin = conns[i].step_frames;
        if (conns[i].step_frames > fmax) fmax = conns[i].step_frames;
    }
    if (!nopen) fmin = 0;
    printf("{\"event\":\"%s\",\"id\":%d,\"t\":%.6f,\"cpu_s\":%.6f,\"sys_s\":%.6f,\"open\":%d,\"closed\":%d,"
           "\"frames\":%llu,\"bytes\":%llu,\"lost\":%llu,\"dup\":%llu,\"late\":%llu,\"stale\":%llu,"
           "\"wrong_chan\":%llu,\"bad_payload\":%llu,\"fragments\":%llu,\"pings\":%llu,\"closes\":%llu,"
           "\"reads\":%llu,\"controls\":%llu,\"wire_bytes\":%llu,\"deflated\":%llu,\"inflates\":%llu,\"inflate_errors\":%llu,"
           "\"conn_frames_min\":%llu,\"conn_frames_max\":%llu,"
           "\"lat_min_ns\":%llu,\"lat_max_ns\":%llu,\"lat_sum_ns\":%llu,\"total_frames\":%llu,\"hist\":",
           event, client_id, (now_ns() - t_begin) / 1e9, cpu_seconds(), sys_seconds(), n_open, n_closed,
           (unsigned long long)s->frames, (unsigned long long)s->bytes, (unsigned long long)s->lost,
           (unsigned long long)s->dup, (unsigned long long)s->late, (unsigned long long)s->stale,
           (unsigned long long)s->wrong_chan,
           (unsigned long long)s->bad_payload, (unsigned long long)s->fragments,
           (unsigned long long)s->pings, (unsigned long long)s->closes, (unsigned long long)s->reads,
           (unsigned long long)s->controls,
           (unsigned long long)s->wire_bytes, (unsigned long long)s->deflated, (unsigned long long)s->inflates,
           (unsigned long long)s->inflate_errors, (unsigned long long)fmin, (unsigned long long)fmax,
           (unsigned long long)(s->frames ? s->lat_min : 0), (unsigned long long)s->lat_max,
           (unsigned long long)s->lat_sum, (unsigned long long)(tot.frames + st.frames));
    print_hist(s->hist);
    printf("}\n");
    fflush(stdout);
}

static void fold_step(void) {
    tot.frames += st.frames;
    tot.bytes += st.bytes;
    tot.lost += st.lost;
    tot.dup += st.dup;
    tot.late += st.late;
    tot.stale += st.stale;
    tot.wrong_chan += st.wrong_chan;
    tot.bad_payload += st.bad_payload;
    tot.fragments += st.fragments;
    tot.pings += st.pings;
    tot.closes += st.closes;
    tot.reads += st.reads;
    tot.controls += st.controls;
    tot.wire_bytes += st.wire_bytes;
    tot.deflated += st.deflated;
    tot.inflates += st.inflates;
    tot.inflate_errors += st.inflate_errors;
    memset(&st, 0, sizeof st);
    st.lat_min = UINT64_MAX;
    for (int i = 0; i < nconns; i++) conns[i].step_frames = 0;
}

static int n_deflate(void) {
    int n = 0;
    for (int i = 0; i < nconns; i++) n += conns[i].state == ST_OPEN && conns[i].deflate;
    return n;
}

static void report_connected(void) {
    double secs = (t_connected - t_begin) / 1e9;
    printf("{\"event\":\"connected\",\"id\":%d,\"conns\":%d,\"open\":%d,\"failed\":%d,"
           "\"failed_refused\":%d,\"failed_timeout\":%d,\"failed_http\":%d,\"failed_other\":%d,\"failed_ext\":%d,"
           "\"deflate\":%d,"
           "\"last_http_status\":\"%s\",\"connect_s\":%.6f,\"conn_per_s\":%.1f,"
           "\"hs_p50_us\":%.1f,\"hs_p99_us\":%.1f,\"hs_max_us\":%.1f,\"cpu_s\":%.6f,\"sys_s\":%.6f,\"hs_hist\":",
           client_id, nconns, n_open, n_failed, fail_status[0], fail_status[1], fail_status[2], fail_status[3],
           fail_status[4], n_deflate(),
           last_http_status, secs, secs > 0 ? n_open / secs : 0.0, hist_quantile(hs_hist, 0.5) / 1e3,
           hist_quantile(hs_hist, 0.99) / 1e3, hs_max / 1e3, cpu_seconds(), sys_seconds());
    print_hist(hs_hist);
    printf("}\n");
    fflush(stdout);
}

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadclient --port P --conns N [--host 127.0.0.1] [--offset O] [--channels M]\n"
            "                  [--prefix bench] [--concurrency 64] [--max-seconds 3600] [--id K]\n"
            "                  [--poll-us 0] [--deflate] [--inflate-cache 1] [--v1]\n"
            "connection i (global index O+i) opens ws://HOST:P/<prefix><(O+i) %% M>\n"
            "stdin commands: r (report and reset), p (peek), q (quit)\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--deflate")) {
            want_deflate = 1;
            continue;
        }
        if (!strcmp(a, "--v1")) {
            v1 = 1;
            continue;
        }
        if (!strcmp(a, "--sse")) {
            sse = 1;
            continue;
        }
        if (!v) usage();
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--offset")) offset = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--channels")) nchannels = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--prefix")) prefix = v;
        else if (!strcmp(a, "--concurrency")) concurrency = atoi(v);
        else if (!strcmp(a, "--max-seconds")) max_seconds = atof(v);
        else if (!strcmp(a, "--id")) client_id = atoi(v);
        else if (!strcmp(a, "--poll-us")) poll_us = atoi(v);
        else if (!strcmp(a, "--inflate-cache")) inflate_cache = atoi(v);
        else usage();
        i++;
    }
    if (port <= 0 || nconns <= 0 || nchannels == 0 || concurrency <= 0) usage();

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rlim_t want = (rlim_t)nconns + 64;
    if (rl.rlim_cur < want) {
        rl.rlim_cur = want <= rl.rlim_max ? want : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur < want) {
        fprintf(stderr, "loadclient: RLIMIT_NOFILE %llu too low for %d connections (hard limit %llu)\n",
                (unsigned long long)rl.rlim_cur, nconns, (unsigned long long)rl.rlim_max);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    conns = calloc((size_t)nconns, sizeof *conns);
    rbuf = malloc(RBUF_SIZE);
    ibuf = malloc(IBUF_SIZE);
    if (!conns || !rbuf || !ibuf) return 1;
    if (inflateInit2(&zs, -15) != Z_OK) {  /* raw deflate, any window up to 32 KiB */
        fprintf(stderr, "loadclient: inflateInit2 failed\n");
        return 1;
    }
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].chan = (offset + (uint32_t)i) % nchannels;
    }
    memset(&st, 0, sizeof st);
    st.lat_min = UINT64_MAX;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    int stdin_polled = epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &sev) == 0;

    t_begin = now_ns();
    uint64_t deadline = t_begin + (uint64_t)(max_seconds * 1e9);
    int connected_reported = 0;
    uint64_t last_timeout_check = t_begin;
    start_more();
    struct epoll_event evs[MAX_EVENTS];
    char cmdbuf[256];
    size_t cmdlen = 0;
    int quit = 0;

    uint64_t next_poll = 0;
    int polled_full = 0;
    while (!quit && !stop_flag) {
        int timeout = connected_reported ? 200 : 50;
        if (poll_us && connected_reported) {
            /* tick mode: sleep to the next tick instead of blocking in epoll_wait, so
               the server's writes find no waiter to wake (no cross-core wake-up) */
            if (!polled_full) {
                uint64_t t = now_ns();
                if (next_poll > t) {
                    struct timespec ts = {.tv_sec = (time_t)(next_poll / 1000000000ull),
                                          .tv_nsec = (long)(next_poll % 1000000000ull)};
                    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                    next_poll += (uint64_t)poll_us * 1000ull;
                } else {
                    next_poll = t + (uint64_t)poll_us * 1000ull;
                }
            }
            timeout = 0;
        }
        int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout);
        polled_full = (n == MAX_EVENTS);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == UINT32_MAX) {
                ssize_t r = read(0, cmdbuf + cmdlen, sizeof cmdbuf - 1 - cmdlen);
                if (r == 0) { quit = 1; break; }
                if (r < 0) continue;
                cmdlen += (size_t)r;
                size_t k = 0;
                for (size_t j = 0; j < cmdlen; j++) {
                    if (cmdbuf[j] != '\n') continue;
                    char cmd = cmdbuf[k];
                    k = j + 1;
                    if (cmd == 'r') {
                        report("report", &st);
                        fold_step();
                    } else if (cmd == 'p') {
                        printf("{\"event\":\"peek\",\"id\":%d,\"open\":%d,\"total_frames\":%llu,\"cpu_s\":%.6f}\n",
                               client_id, n_open, (unsigned long long)(tot.frames + st.frames), cpu_seconds());
                        fflush(stdout);
                    } else if (cmd == 'q') {
                        quit = 1;
                    }
                }
                memmove(cmdbuf, cmdbuf + k, cmdlen - k);
                cmdlen -= k;
                if (cmdlen >= sizeof cmdbuf - 1) cmdlen = 0;
                continue;
            }
            conn_t *c = &conns[id];
            if (c->fd < 0) continue;
            if (c->state == ST_CONNECTING) {
                if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) send_handshake(c);
            } else if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                on_readable(c);
            }
        }
        if (!connected_reported) {
            start_more();
            uint64_t t = now_ns();
            if (t - last_timeout_check > 500000000ull) {
                check_handshake_timeouts(t);
                start_more();
                last_timeout_check = t;
            }
            if (next_to_start >= nconns && in_flight == 0) {
                t_connected = now_ns();
                report_connected();
                connected_reported = 1;
            }
        }
        if (!stdin_polled && connected_reported && now_ns() > deadline) break;
        if (now_ns() > deadline) {
            fprintf(stderr, "loadclient %d: --max-seconds reached\n", client_id);
            break;
        }
    }
    if (!connected_reported) {
        t_connected = now_ns();
        report_connected();
    }
    report("final", &st);
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);
    return 0;
}
