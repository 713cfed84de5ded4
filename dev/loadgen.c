/*
 * loadgen: the native librdkafka load generator of dev/bench (a minimal rdkafka_performance).
 *
 *   loadgen produce --bootstrap HOST:PORT --topic T --size BYTES (--seconds S | --messages N)
 *                   [--rate MSGS_PER_S] [--compression none|lz4|zstd|gzip|snappy]
 *                   [--keys N] [--tenants N] [--linger-ms MS] [--acks all|1]
 *                   [--idempotence true|false] [--one-at-a-time true|false] [--warm-up true|false]
 *   loadgen consume --bootstrap HOST:PORT --topic T [--min-seconds S] [--timeout S]
 *
 * Prints exactly one JSON object on stdout; diagnostics go to stderr. Exit 1 on a failed run
 * (delivery errors, nothing delivered, a consumer that does not reach the end).
 *
 * produce: produces for --seconds, or --messages records (as fast as the client can, or paced at
 * --rate), then flushes. With --one-at-a-time, each record waits for its delivery report before the
 * next is produced: the unloaded latency of one write (use --linger-ms 0). With --warm-up, one
 * record goes to each partition and is delivered before the clock starts, and is not counted: the
 * connection to the leaders, the producer id and (through a proxy) the proxy's own set-up are then
 * done, which matters when a round trip is long or the run is short.
 * Every message has an 11-byte key ("k" + 10 digits, --keys distinct ones, spread over the
 * partitions by librdkafka's default partitioner), one header `tenant: tNN` (--tenants distinct
 * values), and a --size byte value cut from a text-like pool (compressible the way log lines and
 * JSON are, so lz4 and zstd have work to do). Batching is librdkafka's own (linger.ms 5 by default,
 * batch.size 1 MB, acks=all): the "realistic batching" a librdkafka application gets without
 * tuning. --idempotence true turns on librdkafka's idempotent producer (off by default, as in
 * librdkafka; it caps max.in.flight at 5 per broker connection). Latency is librdkafka's
 * rd_kafka_message_latency(): from produce() to the delivery report, in microseconds, so it
 * includes client-side queueing (at full load: the whole queue).
 *
 * consume: reads every partition of --topic from the beginning to the high watermark it saw at
 * start, again and again until --min-seconds have passed, and reports the rate from the first
 * message to the last.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void set(rd_kafka_conf_t *conf, const char *name, const char *value) {
    char err[512];
    if (rd_kafka_conf_set(conf, name, value, err, sizeof err) != RD_KAFKA_CONF_OK)
        die("%s=%s: %s", name, value, err);
}

/* ------------------------------------------------------------ latency histogram */

/* 1 us resolution below 100 ms, 100 us resolution up to 100 s: exact enough for p50/p99 of a
 * loopback run, fixed memory whatever the message count. */
#define FINE_LIMIT_US 100000
#define COARSE_STEP_US 100
#define COARSE_BUCKETS 1000000
static uint64_t fine[FINE_LIMIT_US];
static uint64_t coarse[COARSE_BUCKETS];
static uint64_t samples;

static void record_latency(int64_t us) {
    if (us < 0) us = 0;
    if (us < FINE_LIMIT_US) {
        fine[us]++;
    } else {
        int64_t b = (us - FINE_LIMIT_US) / COARSE_STEP_US;
        if (b >= COARSE_BUCKETS) b = COARSE_BUCKETS - 1;
        coarse[b]++;
    }
    samples++;
}

/* The q-quantile in milliseconds (NaN-free: 0 when there is no sample). */
static double quantile_ms(double q) {
    if (samples == 0) return 0;
    uint64_t rank = (uint64_t)(q * (double)(samples - 1)) + 1, seen = 0;
    for (int64_t i = 0; i < FINE_LIMIT_US; i++)
        if ((seen += fine[i]) >= rank) return i / 1000.0;
    for (int64_t i = 0; i < COARSE_BUCKETS; i++)
        if ((seen += coarse[i]) >= rank) return (FINE_LIMIT_US + i * COARSE_STEP_US) / 1000.0;
    return 0;
}

/* ------------------------------------------------------------ produce */

static uint64_t delivered, delivered_bytes, failed;
static char first_error[256];

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    (void)opaque;
    if (m->err) {
        if (failed++ == 0)
            snprintf(first_error, sizeof first_error, "%s", rd_kafka_err2str(m->err));
        return;
    }
    delivered++;
    delivered_bytes += m->len;
    record_latency(rd_kafka_message_latency(m));
}

/* A text-like value pool: words from a small vocabulary with numbers in between, roughly how
 * JSON and log lines compress (lz4 ~2-3x, zstd ~3-5x). Values are windows into it. */
#define POOL_BYTES (4 << 20)
static char *make_pool(void) {
    static const char *words[] = {
        "\"id\":",     "\"customer\":", "\"amount\":", "\"currency\":\"EUR\"", "\"status\":\"paid\"",
        "\"items\":[", "{\"sku\":",     "\"qty\":",    "\"ts\":",              "\"region\":\"eu\"",
        "order",       "invoice",       "shipment",    "warehouse",            "true",
        "false",       "null",          "},",          "],",                   "\"note\":\"",
    };
    char *pool = malloc(POOL_BYTES + 64);
    if (!pool) die("out of memory");
    uint64_t x = 0x9E3779B97F4A7C15ull;
    size_t n = 0;
    while (n < POOL_BYTES) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        if (x % 3 == 0) {
            n += (size_t)snprintf(pool + n, 32, "%" PRIu64 ",", (x >> 20) % 100000);
        } else {
            const char *w = words[(x >> 8) % (sizeof words / sizeof *words)];
            size_t l = strlen(w);
            memcpy(pool + n, w, l);
            n += l;
        }
    }
    return pool;
}

struct opts {
    const char *mode, *bootstrap, *topic, *compression, *acks, *idempotence, *one_at_a_time, *warm_up;
    long size, keys, tenants, linger_ms, messages;
    double seconds, rate, min_seconds, timeout;
};

static int produce(const struct opts *o) {
    char err[512], buf[64];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", o->bootstrap);
    set(conf, "compression.codec", o->compression);
    set(conf, "acks", o->acks);
    snprintf(buf, sizeof buf, "%ld", o->linger_ms);
    set(conf, "linger.ms", buf);
    set(conf, "enable.idempotence", o->idempotence);
    set(conf, "client.id", "keyward-bench");
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    int one_at_a_time = !strcmp(o->one_at_a_time, "true");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (!rk) die("producer: %s", err);

    char *pool = make_pool();
    size_t window = POOL_BYTES - (size_t)o->size;
    char key[24], tenant[24];
    uint64_t sent = 0;
    /* Time produce() spent refused with a full queue (100,000 messages): when this is most of
       the run, the broker side (broker, relay) sets the pace; when it is near 0, the client's
       own CPU does. */
    double queue_full_s = 0;

    /* Connect and learn the partitions before the clock starts. */
    const struct rd_kafka_metadata *md;
    rd_kafka_topic_t *t = rd_kafka_topic_new(rk, o->topic, NULL);
    if (rd_kafka_metadata(rk, 0, t, &md, 10000) != RD_KAFKA_RESP_ERR_NO_ERROR || md->topic_cnt != 1 ||
        md->topics[0].err)
        die("metadata for %s failed", o->topic);
    int parts = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(t);

    if (!strcmp(o->warm_up, "true")) {
        for (int p = 0; p < parts; p++)
            if (rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(o->topic), RD_KAFKA_V_PARTITION(p),
                                  RD_KAFKA_V_KEY("k0000000000", 11),
                                  RD_KAFKA_V_VALUE(pool, (size_t)o->size), RD_KAFKA_V_END))
                die("warm-up produce failed");
        if (rd_kafka_flush(rk, 60000) || failed) die("warm-up: %s", failed ? first_error : "flush timed out");
        delivered = delivered_bytes = samples = 0;
        memset(fine, 0, sizeof fine);
        memset(coarse, 0, sizeof coarse);
    }

    double start = now_s(), end = start + o->seconds;
    for (;;) {
        double now = now_s();
        if (o->messages > 0 ? sent >= (uint64_t)o->messages : now >= end) break;
        if (o->rate > 0 && (double)sent >= (now - start) * o->rate) {
            rd_kafka_poll(rk, 0);
            usleep(200);
            continue;
        }
        snprintf(key, sizeof key, "k%010" PRIu64, (sent * 2654435761u) % (uint64_t)o->keys);
        snprintf(tenant, sizeof tenant, "t%02" PRIu64, sent % (uint64_t)o->tenants);
        const char *value = pool + (sent * 7919) % window;
        for (;;) {
            rd_kafka_resp_err_t e = rd_kafka_producev(
                rk, RD_KAFKA_V_TOPIC(o->topic), RD_KAFKA_V_KEY(key, 11),
                RD_KAFKA_V_VALUE((void *)value, (size_t)o->size),
                RD_KAFKA_V_HEADER("tenant", tenant, (ssize_t)strlen(tenant)),
                RD_KAFKA_V_MSGFLAGS(0), RD_KAFKA_V_END);
            if (e == RD_KAFKA_RESP_ERR_NO_ERROR) break;
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) die("produce: %s", rd_kafka_err2str(e));
            double blocked = now_s();
            rd_kafka_poll(rk, 1);
            queue_full_s += now_s() - blocked;
        }
        if (one_at_a_time) {
            /* The delivery report of this record, before the next is produced. */
            uint64_t done = delivered + failed;
            while (delivered + failed == done) rd_kafka_poll(rk, 10);
            sent++;
            continue;
        }
        if (++sent % 1024 == 0) rd_kafka_poll(rk, 0);
    }
    double produced_for = now_s() - start;
    rd_kafka_resp_err_t fe = rd_kafka_flush(rk, 120000);
    double elapsed = now_s() - start;
    rd_kafka_destroy(rk);
    free(pool);

    double mps = delivered / elapsed;
    printf("{\"mode\":\"produce\",\"sent\":%" PRIu64 ",\"delivered\":%" PRIu64
           ",\"failed\":%" PRIu64 ",\"bytes\":%" PRIu64
           ",\"seconds\":%.4f,\"produce_seconds\":%.4f,\"msgs_per_s\":%.1f,\"mb_per_s\":%.3f"
           ",\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"p999_ms\":%.3f,\"max_ms\":%.3f"
           ",\"rate\":%.1f,\"queue_full_s\":%.3f,\"first_error\":\"%s\"}\n",
           sent, delivered, failed, delivered_bytes, elapsed, produced_for, mps,
           delivered_bytes / elapsed / 1e6, quantile_ms(0.5), quantile_ms(0.99),
           quantile_ms(0.999), quantile_ms(1.0), o->rate, queue_full_s, first_error);
    if (fe != RD_KAFKA_RESP_ERR_NO_ERROR) fprintf(stderr, "loadgen: flush: %s\n", rd_kafka_err2str(fe));
    return (failed || !delivered || fe) ? 1 : 0;
}

/* ------------------------------------------------------------ consume */

static int consume(const struct opts *o) {
    char err[512], group[64];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", o->bootstrap);
    snprintf(group, sizeof group, "keyward-bench-%d-%ld", getpid(), (long)time(NULL));
    set(conf, "group.id", group);
    set(conf, "enable.auto.commit", "false");
    set(conf, "enable.auto.offset.store", "false");
    set(conf, "client.id", "keyward-bench");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (!rk) die("consumer: %s", err);
    rd_kafka_poll_set_consumer(rk);

    const struct rd_kafka_metadata *md;
    rd_kafka_topic_t *t = rd_kafka_topic_new(rk, o->topic, NULL);
    if (rd_kafka_metadata(rk, 0, t, &md, 10000) != RD_KAFKA_RESP_ERR_NO_ERROR || md->topic_cnt != 1 ||
        md->topics[0].err)
        die("metadata for %s failed", o->topic);
    int parts = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(t);

    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(parts);
    int64_t *ends = calloc((size_t)parts, sizeof *ends);
    uint64_t per_pass = 0;
    for (int p = 0; p < parts; p++) {
        int64_t lo, hi;
        if (rd_kafka_query_watermark_offsets(rk, o->topic, p, &lo, &hi, 10000))
            die("watermarks of %s-%d failed", o->topic, p);
        ends[p] = hi;
        per_pass += (uint64_t)(hi - lo);
        rd_kafka_topic_partition_list_add(list, o->topic, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
    }
    if (per_pass == 0) die("%s is empty", o->topic);

    uint64_t msgs = 0, bytes = 0;
    int passes = 0, ok = 1;
    double first = 0, last = 0, deadline = now_s() + o->timeout;
    while (ok) {
        rd_kafka_assign(rk, list);
        int open = parts;
        int64_t *pos = calloc((size_t)parts, sizeof *pos);
        for (int p = 0; p < parts; p++)
            if (ends[p] == 0) open--;
        while (open > 0) {
            if (now_s() > deadline) {
                fprintf(stderr, "loadgen: consume timed out after %.0fs\n", o->timeout);
                ok = 0;
                break;
            }
            rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
            if (!m) continue;
            if (m->err) {
                if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                    fprintf(stderr, "loadgen: consume: %s\n", rd_kafka_message_errstr(m));
                rd_kafka_message_destroy(m);
                continue;
            }
            if (msgs == 0) first = now_s();
            msgs++;
            bytes += m->len;
            int p = m->partition;
            if (p >= 0 && p < parts && pos[p] < ends[p] && m->offset + 1 >= ends[p]) open--;
            if (p >= 0 && p < parts) pos[p] = m->offset + 1;
            rd_kafka_message_destroy(m);
        }
        free(pos);
        last = now_s();
        passes++;
        if (last - first >= o->min_seconds) break;
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    double elapsed = last - first;
    if (elapsed <= 0) elapsed = 1e-9;
    printf("{\"mode\":\"consume\",\"messages\":%" PRIu64 ",\"bytes\":%" PRIu64
           ",\"passes\":%d,\"seconds\":%.4f,\"msgs_per_s\":%.1f,\"mb_per_s\":%.3f}\n",
           msgs, bytes, passes, elapsed, msgs / elapsed, bytes / elapsed / 1e6);
    return ok ? 0 : 1;
}

/* ------------------------------------------------------------ main */

int main(int argc, char **argv) {
    struct opts o = {.compression = "none", .acks = "all", .idempotence = "false",
                     .one_at_a_time = "false", .warm_up = "false", .size = 100, .keys = 100000,
                     .tenants = 16, .linger_ms = 5, .seconds = 5, .min_seconds = 3,
                     .timeout = 120};
    if (argc < 2) die("usage: loadgen produce|consume --bootstrap B --topic T ...");
    o.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) die("%s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--bootstrap")) o.bootstrap = v;
        else if (!strcmp(a, "--topic")) o.topic = v;
        else if (!strcmp(a, "--compression")) o.compression = v;
        else if (!strcmp(a, "--acks")) o.acks = v;
        else if (!strcmp(a, "--idempotence")) o.idempotence = v;
        else if (!strcmp(a, "--one-at-a-time")) o.one_at_a_time = v;
        else if (!strcmp(a, "--warm-up")) o.warm_up = v;
        else if (!strcmp(a, "--messages")) o.messages = atol(v);
        else if (!strcmp(a, "--size")) o.size = atol(v);
        else if (!strcmp(a, "--keys")) o.keys = atol(v);
        else if (!strcmp(a, "--tenants")) o.tenants = atol(v);
        else if (!strcmp(a, "--linger-ms")) o.linger_ms = atol(v);
        else if (!strcmp(a, "--seconds")) o.seconds = atof(v);
        else if (!strcmp(a, "--rate")) o.rate = atof(v);
        else if (!strcmp(a, "--min-seconds")) o.min_seconds = atof(v);
        else if (!strcmp(a, "--timeout")) o.timeout = atof(v);
        else die("unknown option %s", a);
    }
    if (!o.bootstrap || !o.topic) die("--bootstrap and --topic are required");
    if (o.size < 1 || o.size > POOL_BYTES / 2) die("bad --size %ld", o.size);
    if (o.keys < 1 || o.keys > 1000000000L || o.tenants < 1 || o.tenants > 99) die("bad --keys or --tenants");
    if (!strcmp(o.mode, "produce")) return produce(&o);
    if (!strcmp(o.mode, "consume")) return consume(&o);
    die("unknown mode %s", o.mode);
}
