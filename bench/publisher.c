/*
 * publisher: a paced Redis PUBLISH load generator for the sockdrawer
 * benchmark.
 *
 * Publishes COUNT = rate x duration messages on NCHAN Redis channels
 * "<namespace>/<prefix><c>", message i on channel i % NCHAN with per-channel
 * sequence number i / NCHAN.  Every tick (1 ms by default) it writes the
 * messages that are due as pipelined RESP PUBLISH commands in one write(),
 * and reads the integer replies without waiting for them.
 *
 * Payload (ASCII, padded with '.' to --size bytes; parsed by loadclient.c):
 *     "SSSS QQQQQQQQQQQQ TTTTTTTTTTTTTTTT CCCCCCCC "
 *      step  seq          CLOCK_MONOTONIC ns at write, channel index
 *
 * With --payload json, the same 44-byte header is the first field of a JSON
 * object of exactly --size bytes, at offset 8:
 *     {"seq":"SSSS QQQQQQQQQQQQ TTTTTTTTTTTTTTTT CCCCCCCC ","type":"trade.batch",...,
 *      "items":[{"id":4821337,"symbol":"ACME","side":"buy","price":101.25,...},...],"note":"..."}
 * a batch of trade records (repeated keys, numbers, a few enumerated
 * strings) as a JSON API would send, and as compressible (deflate, each
 * message on its own: 1,024 bytes to about 400).  64 variants with different
 * numbers are made at start (fixed seed) and used in turn; the header is
 * written into each message.
 *
 * At the end it waits for every reply and prints one JSON line.
 *
 * Build: gcc -O2 -o publisher publisher.c      (libc only)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HDR_LEN 44
#define JSON_AT 8          /* strlen("{\"seq\":\"") */
#define JSON_VARIANTS 64
#define JSON_MIN_SIZE 192

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

static const char HEX[] = "0123456789abcdef";

static inline void puthex(char *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) {
        p[i] = HEX[v & 15];
        v >>= 4;
    }
}

/* xorshift64: deterministic payloads from run to run */
static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint32_t rnd(uint32_t n) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)((rng_state >> 11) % n);
}

/*
 * One JSON message of exactly `size` bytes (size >= JSON_MIN_SIZE), the
 * header placeholder at JSON_AT: trade records while they fit, then a "note"
 * string of words filling the rest.
 */
static void json_payload(char *out, size_t size) {
    static const char *symbols[] = {"ACME", "GLOBX", "INITECH", "UMBRL", "HOOLI", "STARK", "WAYNE", "CYBDN",
                                    "SOYLNT", "TYRELL", "WONKA", "OSCORP"};
    static const char *venues[] = {"XNAS", "XNYS", "BATS", "ARCX", "IEXG"};
    static const char *status[] = {"filled", "partial", "open", "cancelled"};
    static const char *words[] = {"order", "book", "snapshot", "delayed", "market", "data", "feed", "partial",
                                  "fill", "cancel", "replace", "venue", "halt", "resumed", "auction", "close"};
    const char *tail = "],\"note\":\"";
    size_t n = (size_t)sprintf(out,
                               "{\"seq\":\"0000 000000000000 0000000000000000 00000000 \",\"type\":\"trade.batch\","
                               "\"source\":\"bench-feed\",\"version\":3,\"items\":[");
    char item[256];
    for (int k = 0;; k++) {
        uint32_t price = 1000 + rnd(99000);
        int l = snprintf(item, sizeof item,
                         "%s{\"id\":%u,\"symbol\":\"%s\",\"side\":\"%s\",\"price\":%u.%02u,\"qty\":%u,"
                         "\"venue\":\"%s\",\"status\":\"%s\",\"ts\":%llu}",
                         k ? "," : "", 1000000 + rnd(9000000), symbols[rnd(12)], rnd(2) ? "buy" : "sell",
                         price / 100, price % 100, (1 + rnd(50)) * 100, venues[rnd(5)], status[rnd(4)],
                         1732749000000ull + rnd(1000000));
        if (n + (size_t)l + strlen(tail) + 2 + 8 > size) break;  /* keep room for a note of >= 8 bytes */
        memcpy(out + n, item, (size_t)l);
        n += (size_t)l;
    }
    memcpy(out + n, tail, strlen(tail));
    n += strlen(tail);
    while (n < size - 2) {  /* words, the last one cut to fit */
        const char *w = words[rnd(16)];
        while (*w && n < size - 2) out[n++] = *w++;
        if (n < size - 2) out[n++] = ' ';
    }
    out[n++] = '"';
    out[n++] = '}';
}

static volatile sig_atomic_t stop_flag;
static void on_signal(int s) {
    (void)s;
    stop_flag = 1;
}

/* reply parser state */
static uint64_t replies, receivers, zero_receivers, errors;
static char rline[256];
static size_t rlen;

static void parse_replies(const char *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        char ch = b[i];
        if (ch != '\n') {
            if (rlen < sizeof rline - 1) rline[rlen++] = ch;
            continue;
        }
        rline[rlen] = 0;
        if (rline[0] == ':') {
            long long v = atoll(rline + 1);
            replies++;
            receivers += (uint64_t)v;
            if (v == 0) zero_receivers++;
        } else if (rline[0] == '-') {
            replies++;
            errors++;
            if (errors < 5) fprintf(stderr, "publisher: redis error: %s\n", rline);
        }
        rlen = 0;
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: publisher --port REDIS_PORT --rate MSG_PER_S --duration S [--host 127.0.0.1]\n"
            "                 [--channels 1] [--prefix bench] [--namespace sock-drawer] [--size 100]\n"
            "                 [--step 1] [--tick-us 1000] [--max-batch 20000] [--max-wait 60]\n"
            "                 [--payload dots|json]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *prefix = "bench", *ns = "sock-drawer", *kind = "dots";
    int port = 0;
    double rate = 0, duration = 0, max_wait = 60;
    uint64_t nchan = 1, size = 100, step = 1, tick_us = 1000, max_batch = 20000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--channels")) nchan = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--prefix")) prefix = v;
        else if (!strcmp(a, "--namespace")) ns = v;
        else if (!strcmp(a, "--size")) size = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--step")) step = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--tick-us")) tick_us = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--max-batch")) max_batch = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--max-wait")) max_wait = atof(v);
        else if (!strcmp(a, "--payload")) kind = v;
        else usage();
        i++;
    }
    int json = !strcmp(kind, "json");
    if (!json && strcmp(kind, "dots")) usage();
    if (port <= 0 || rate <= 0 || duration <= 0 || nchan == 0 || size < HDR_LEN || tick_us == 0) usage();
    if (json && size < JSON_MIN_SIZE) {
        fprintf(stderr, "publisher: --payload json needs --size >= %d\n", JSON_MIN_SIZE);
        return 2;
    }
    if (step > 0xffff) step &= 0xffff;
    uint64_t total = (uint64_t)(rate * duration + 0.5);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    /* RESP prefix per channel */
    char **pre = malloc(nchan * sizeof *pre);
    size_t *prelen = malloc(nchan * sizeof *prelen);
    size_t maxpre = 0;
    for (uint64_t c = 0; c < nchan; c++) {
        char chname[512];
        int cl = snprintf(chname, sizeof chname, "%s/%s%llu", ns, prefix, (unsigned long long)c);
        char tmp[700];
        int l = snprintf(tmp, sizeof tmp, "*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%llu\r\n", cl, chname,
                         (unsigned long long)size);
        pre[c] = malloc((size_t)l);
        memcpy(pre[c], tmp, (size_t)l);
        prelen[c] = (size_t)l;
        if ((size_t)l > maxpre) maxpre = (size_t)l;
    }
    size_t msgmax = maxpre + size + 2;
    /* the payload(s), header at `at`; per message only seq, time and channel change */
    int variants = json ? JSON_VARIANTS : 1;
    size_t at = json ? JSON_AT : 0;
    char *payload = malloc(size * (size_t)variants);
    for (int k = 0; k < variants; k++) {
        char *p = payload + size * (size_t)k;
        if (json) {
            json_payload(p, size);
        } else {
            memset(p, '.', size);
            memcpy(p, "0000 000000000000 0000000000000000 00000000 ", HDR_LEN);
        }
        puthex(p + at, step, 4);
    }

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &sin.sin_addr);
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) < 0) {
        perror("publisher: connect");
        return 1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, O_NONBLOCK);

    size_t outcap = msgmax * (max_batch + 16);
    char *out = malloc(outcap);
    size_t outlen = 0, outpos = 0;
    char inbuf[65536];
    uint64_t sent = 0, max_lag_ns = 0, writes = 0;
    uint64_t t0 = now_ns();
    uint64_t tick = tick_us * 1000ull;
    uint64_t next_tick = t0;
    uint64_t t_last_sent = t0;
    double cpu0 = cpu_seconds();
    int io_error = 0;

    while (!stop_flag && !io_error) {
        uint64_t now = now_ns();
        if (sent < total && outpos == outlen && now >= next_tick) {
            /* messages due by now */
            uint64_t due = (uint64_t)((double)(now - t0) * rate / 1e9) + 1;
            if (due > total) due = total;
            if (due > sent) {
                uint64_t n = due - sent;
                if (n > max_batch) n = max_batch;
                /* lag: how late the oldest message in this batch is */
                uint64_t sched = t0 + (uint64_t)((double)sent * 1e9 / rate);
                if (now > sched && now - sched > max_lag_ns) max_lag_ns = now - sched;
                outlen = outpos = 0;
                uint64_t ts = now_ns();
                for (uint64_t k = 0; k < n; k++, sent++) {
                    uint64_t c = sent % nchan, seq = sent / nchan;
                    memcpy(out + outlen, pre[c], prelen[c]);
                    outlen += prelen[c];
                    char *p = out + outlen;
                    memcpy(p, payload + size * (seq % (uint64_t)variants), size);
                    p += at;
                    puthex(p + 5, seq, 12);
                    puthex(p + 18, ts, 16);
                    puthex(p + 35, c, 8);
                    outlen += size;
                    out[outlen++] = '\r';
                    out[outlen++] = '\n';
                }
                t_last_sent = ts;
            }
            next_tick += tick;
            if (next_tick < now) next_tick = now + tick; /* behind: don't burst to catch up ticks */
        }
        while (outpos < outlen) {
            ssize_t w = write(fd, out + outpos, outlen - outpos);
            if (w > 0) {
                outpos += (size_t)w;
                writes++;
            } else {
                if (w < 0 && errno != EAGAIN && errno != EINTR) {
                    perror("publisher: write");
                    io_error = 1;
                }
                break;
            }
        }
        /* read replies */
        for (;;) {
            ssize_t r = read(fd, inbuf, sizeof inbuf);
            if (r > 0) {
                parse_replies(inbuf, (size_t)r);
                continue;
            }
            if (r == 0) {
                fprintf(stderr, "publisher: redis closed the connection\n");
                io_error = 1;
            } else if (errno != EAGAIN && errno != EINTR) {
                perror("publisher: read");
                io_error = 1;
            }
            break;
        }
        if (sent >= total && outpos == outlen) {
            if (replies >= sent) break;
            if ((now_ns() - t_last_sent) / 1e9 > max_wait) {
                fprintf(stderr, "publisher: gave up waiting for %llu replies\n",
                        (unsigned long long)(sent - replies));
                break;
            }
        }
        /* sleep until the next tick, or until the socket is ready */
        struct pollfd pfd = {.fd = fd, .events = POLLIN | (outpos < outlen ? POLLOUT : 0)};
        uint64_t t = now_ns();
        uint64_t wait_ns = 0;
        if (outpos < outlen) wait_ns = 100000000ull;
        else if (sent < total) wait_ns = next_tick > t ? next_tick - t : 0;
        else wait_ns = 100000000ull;
        struct timespec tsw = {.tv_sec = (time_t)(wait_ns / 1000000000ull), .tv_nsec = (long)(wait_ns % 1000000000ull)};
        if (wait_ns) ppoll(&pfd, 1, &tsw, NULL);
    }
    uint64_t t_end = now_ns();
    double send_s = (t_last_sent - t0) / 1e9;
    printf("{\"sent\":%llu,\"target\":%llu,\"replies\":%llu,\"receivers\":%llu,\"zero_receivers\":%llu,"
           "\"errors\":%llu,\"rate\":%.3f,\"achieved_rate\":%.1f,\"send_s\":%.6f,\"elapsed_s\":%.6f,"
           "\"max_lag_ms\":%.3f,\"writes\":%llu,\"cpu_s\":%.6f,\"channels\":%llu,\"size\":%llu,\"step\":%llu,"
           "\"io_error\":%d,\"interrupted\":%d}\n",
           (unsigned long long)sent, (unsigned long long)total, (unsigned long long)replies,
           (unsigned long long)receivers, (unsigned long long)zero_receivers, (unsigned long long)errors, rate,
           send_s > 0 && sent > 1 ? (sent - 1) / send_s : 0.0, send_s, (t_end - t0) / 1e9, max_lag_ns / 1e6,
           (unsigned long long)writes, cpu_seconds() - cpu0, (unsigned long long)nchan, (unsigned long long)size,
           (unsigned long long)step, io_error, (int)stop_flag);
    fflush(stdout);
    close(fd);
    return io_error ? 1 : 0;
}
