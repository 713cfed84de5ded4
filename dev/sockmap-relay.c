/*
 * sockmap-relay: a TCP relay whose bytes never leave the kernel, for dev/bench only.
 *
 * It answers one question of issue 5: would forwarding bytes inside the kernel, instead of
 * reading them into a proxy and writing them out again, bring a relay closer to a direct
 * connection on this kind of machine? Each accepted connection and its upstream connection go
 * into a BPF sockmap with an sk_skb verdict program that redirects every segment arriving on one
 * socket to the other socket's send side (bpf_sk_redirect_map). The process itself only accepts,
 * connects, and waits for either side to close.
 *
 * It understands nothing of Kafka, so it is the kernel-side counterpart of haproxy in TCP mode,
 * not of keyward. It needs CAP_BPF and CAP_NET_ADMIN (root) and Linux 5.13 or later (a verdict
 * program without a stream parser).
 *
 *   sockmap-relay LISTEN_PORT UPSTREAM_PORT     both on 127.0.0.1
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static long bpf(int cmd, union bpf_attr *attr) { return syscall(__NR_bpf, cmd, attr, sizeof(*attr)); }

static void die(const char *what) {
    perror(what);
    exit(1);
}

#define INSN(c, d, s, o, i) ((struct bpf_insn){.code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i)})

enum { CLIENT = 0, UPSTREAM = 1 };

/* A sockmap of two slots and a verdict program attached to it that sends what arrives on the
 * client socket (local port = the listening port) to slot UPSTREAM and everything else to slot
 * CLIENT. One map and one program per connection pair keeps the program free of lookups. */
static int join(int client, int upstream, int listen_port) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_SOCKMAP;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 2;
    int map = bpf(BPF_MAP_CREATE, &attr);
    if (map < 0) die("bpf(BPF_MAP_CREATE)");

    struct bpf_insn prog[] = {
        INSN(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0),                           /* r6 = skb */
        INSN(BPF_LDX | BPF_MEM | BPF_W, 2, 1, offsetof(struct __sk_buff, local_port), 0),
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, 3, 0, 0, CLIENT),                      /* r3 = slot */
        INSN(BPF_JMP | BPF_JNE | BPF_K, 2, 0, 1, listen_port),
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, 3, 0, 0, UPSTREAM),
        INSN(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0),
        INSN(BPF_LD | BPF_DW | BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, map), INSN(0, 0, 0, 0, 0),
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 0),                           /* egress */
        INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_map),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    };
    char log[4096] = {0};
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_SK_SKB;
    attr.expected_attach_type = BPF_SK_SKB_VERDICT;
    attr.insns = (unsigned long)prog;
    attr.insn_cnt = sizeof prog / sizeof prog[0];
    attr.license = (unsigned long)"GPL";
    attr.log_buf = (unsigned long)log;
    attr.log_size = sizeof log;
    attr.log_level = 1;
    int verdict = bpf(BPF_PROG_LOAD, &attr);
    if (verdict < 0) {
        fprintf(stderr, "%s\n", log);
        die("bpf(BPF_PROG_LOAD)");
    }
    memset(&attr, 0, sizeof attr);
    attr.target_fd = map;
    attr.attach_bpf_fd = verdict;
    attr.attach_type = BPF_SK_SKB_VERDICT;
    if (bpf(BPF_PROG_ATTACH, &attr)) die("bpf(BPF_PROG_ATTACH)");
    close(verdict); /* the map holds it now */

    int fds[2] = {[CLIENT] = client, [UPSTREAM] = upstream};
    for (unsigned slot = 0; slot < 2; slot++) {
        unsigned fd = fds[slot];
        memset(&attr, 0, sizeof attr);
        attr.map_fd = map;
        attr.key = (unsigned long)&slot;
        attr.value = (unsigned long)&fd;
        if (bpf(BPF_MAP_UPDATE_ELEM, &attr)) die("bpf(BPF_MAP_UPDATE_ELEM)");
    }
    return map;
}

static int relay(int client, int listen_port, int upstream_port) {
    int upstream = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(upstream_port)};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(upstream, (struct sockaddr *)&to, sizeof to)) die("connect upstream");
    int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(upstream, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    join(client, upstream, listen_port);

    /* What the client sent before its socket joined the map is still in its receive queue, and
     * a Kafka client waits for the answer to it: forward it by hand. */
    char buf[65536];
    ssize_t n;
    while ((n = recv(client, buf, sizeof buf, MSG_DONTWAIT)) > 0)
        if (send(upstream, buf, n, 0) != n) die("send");

    /* From here on the kernel forwards; wait for either side to hang up. */
    struct pollfd p[2] = {{client, POLLRDHUP, 0}, {upstream, POLLRDHUP, 0}};
    while (poll(p, 2, -1) < 0)
        if (errno != EINTR) die("poll");
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: sockmap-relay LISTEN_PORT UPSTREAM_PORT\n");
        return 2;
    }
    int listen_port = atoi(argv[1]), upstream_port = atoi(argv[2]);
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons(listen_port)};
    at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&at, sizeof at) || listen(listener, 1024)) die("listen");
    /* Fail here, not in a connection's child, where the kernel or the capabilities lack sockmap. */
    int a = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(a, (struct sockaddr *)&at, sizeof at)) die("connect to self");
    int b = accept(listener, NULL, NULL);
    if (b < 0) die("accept self");
    close(join(b, a, listen_port));
    close(a);
    close(b);
    for (;;) {
        int client = accept(listener, NULL, NULL);
        if (client < 0) continue;
        if (fork() == 0) {
            close(listener);
            _exit(relay(client, listen_port, upstream_port));
        }
        close(client);
    }
}
