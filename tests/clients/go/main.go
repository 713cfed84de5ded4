// Command franz-client is the franz-go client of keyward's end-to-end tests.
//
// It reads one JSON spec (a file path, or "-" for stdin), runs it with a real
// franz-go client and prints exactly one JSON document on stdout; logs go to
// stderr. The spec format is shared with the Java client and documented in
// tests/e2e/harness/clients.py. Bytes travel as standard base64 (Go's []byte
// JSON encoding), null stays null. Broker errors are reported with the Kafka
// protocol's code and name from kerr; client-side errors (timeouts, aborts)
// carry no code.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

type header struct {
	Key   string `json:"key"`
	Value []byte `json:"value"`
}

type record struct {
	Topic     string `json:"topic,omitempty"`
	Partition *int32 `json:"partition"`
	Offset    *int64 `json:"offset,omitempty"`
	Timestamp *int64 `json:"timestamp,omitempty"`
	// When the consumer handed the record to the application (Unix ms).
	ReceivedMs *int64   `json:"received_ms,omitempty"`
	Key        []byte   `json:"key"`
	Value      []byte   `json:"value"`
	Headers    []header `json:"headers"`
}

type config struct {
	Acks              string         `json:"acks"`
	Idempotence       *bool          `json:"idempotence"`
	Compression       string         `json:"compression"`
	LingerMs          *int64         `json:"linger_ms"`
	DeliveryTimeoutMs *int64         `json:"delivery_timeout_ms"`
	RequestTimeoutMs  *int64         `json:"request_timeout_ms"`
	Retries           *int           `json:"retries"`
	BatchSize         *int32         `json:"batch_size"`
	MaxInFlight       *int           `json:"max_in_flight"`
	ClientID          *string        `json:"client_id"`
	GroupProtocol     *string        `json:"group_protocol"`
	AutoCommitMs      *int64         `json:"auto_commit_ms"`
	SessionTimeoutMs  *int64         `json:"session_timeout_ms"`
	Security          *security      `json:"security"`
	Native            map[string]any `json:"native"`
}

// security is the harness's security knob (see clients.py); nil means PLAINTEXT.
type security struct {
	Protocol  string  `json:"protocol"`
	CA        *string `json:"ca"`
	Cert      *string `json:"cert"`
	Key       *string `json:"key"`
	Mechanism *string `json:"mechanism"`
	Username  string  `json:"username"`
	Password  string  `json:"password"`
}

type spec struct {
	Op            string   `json:"op"`
	Bootstrap     string   `json:"bootstrap"`
	Topic         string   `json:"topic"`
	Topics        []string `json:"topics"`
	Records       []record `json:"records"`
	FlushEvery    int      `json:"flush_every"`
	Pause         *pause   `json:"pause"`
	TimeoutMs     int64    `json:"timeout_ms"`
	GroupID       string   `json:"group_id"`
	ExpectedCount int      `json:"expected_count"`
	// StopFile ends a consume early once it exists (a consumer kept open across switches).
	StopFile string `json:"stop_file"`
	Commit   *bool  `json:"commit"`
	Config   config `json:"config"`
}

// pause keeps one producer across a switch: after the first After records are sent and
// flushed, it waits until UntilFile exists before it sends the rest.
type pause struct {
	After     int    `json:"after"`
	UntilFile string `json:"until_file"`
}

type delivery struct {
	OK           bool    `json:"ok"`
	Partition    *int32  `json:"partition"`
	Offset       *int64  `json:"offset"`
	ErrorCode    *int16  `json:"error_code"`
	ErrorName    *string `json:"error_name"`
	ErrorMessage *string `json:"error_message"`
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: franz-client SPEC.json | -")
		os.Exit(2)
	}
	var raw []byte
	var err error
	if os.Args[1] == "-" {
		raw, err = io.ReadAll(os.Stdin)
	} else {
		raw, err = os.ReadFile(os.Args[1])
	}
	if err != nil {
		fail(err)
	}
	var s spec
	if err := json.Unmarshal(raw, &s); err != nil {
		fail(fmt.Errorf("bad spec: %w", err))
	}
	if s.TimeoutMs <= 0 {
		s.TimeoutMs = 30_000
	}
	var out any
	switch s.Op {
	case "produce":
		out, err = produce(&s)
	case "consume":
		out, err = consume(&s)
	case "metadata":
		out, err = metadata(&s)
	default:
		err = fmt.Errorf("unknown op %q", s.Op)
	}
	if err != nil {
		fail(err)
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "franz-client:", err)
	os.Exit(1)
}

func commonOpts(s *spec) ([]kgo.Opt, error) {
	level := kgo.LogLevelWarn
	if os.Getenv("KEYWARD_CLIENT_LOG") == "debug" {
		level = kgo.LogLevelDebug
	} else if os.Getenv("KEYWARD_CLIENT_LOG") == "info" {
		level = kgo.LogLevelInfo
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(strings.Split(s.Bootstrap, ",")...),
		kgo.WithLogger(kgo.BasicLogger(os.Stderr, level, nil)),
	}
	if s.Config.ClientID != nil {
		opts = append(opts, kgo.ClientID(*s.Config.ClientID))
	}
	if s.Config.Security != nil {
		sec, err := securityOpts(s.Config.Security)
		if err != nil {
			return nil, err
		}
		opts = append(opts, sec...)
	}
	return opts, nil
}

// securityOpts maps the security knob onto franz-go: TLS with the given roots and
// optional client certificate, and a SASL mechanism. ServerName stays empty: franz-go
// then sets it to the host of each broker it dials, so the server's name is verified.
func securityOpts(sec *security) ([]kgo.Opt, error) {
	var opts []kgo.Opt
	switch sec.Protocol {
	case "SSL", "SASL_SSL":
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if sec.CA != nil {
			pem, err := os.ReadFile(*sec.CA)
			if err != nil {
				return nil, err
			}
			cfg.RootCAs = x509.NewCertPool()
			if !cfg.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("no certificate in %s", *sec.CA)
			}
		}
		if sec.Cert != nil && sec.Key != nil {
			cert, err := tls.LoadX509KeyPair(*sec.Cert, *sec.Key)
			if err != nil {
				return nil, err
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
		opts = append(opts, kgo.DialTLSConfig(cfg))
	case "SASL_PLAINTEXT":
	default:
		return nil, fmt.Errorf("bad security protocol %q", sec.Protocol)
	}
	if sec.Protocol == "SSL" {
		return opts, nil
	}
	if sec.Mechanism == nil {
		return nil, fmt.Errorf("%s needs a SASL mechanism", sec.Protocol)
	}
	var m sasl.Mechanism
	switch *sec.Mechanism {
	case "PLAIN":
		m = plain.Auth{User: sec.Username, Pass: sec.Password}.AsMechanism()
	case "SCRAM-SHA-256":
		m = scram.Auth{User: sec.Username, Pass: sec.Password}.AsSha256Mechanism()
	case "SCRAM-SHA-512":
		m = scram.Auth{User: sec.Username, Pass: sec.Password}.AsSha512Mechanism()
	default:
		return nil, fmt.Errorf("bad SASL mechanism %q", *sec.Mechanism)
	}
	return append(opts, kgo.SASL(m)), nil
}

// ---------------------------------------------------------------- produce

func produce(s *spec) (any, error) {
	c := s.Config
	if len(c.Native) > 0 {
		return nil, fmt.Errorf("franz-go takes no raw properties (native: %v)", c.Native)
	}
	opts, err := commonOpts(s)
	if err != nil {
		return nil, err
	}
	switch c.Acks {
	case "all", "-1", "":
		opts = append(opts, kgo.RequiredAcks(kgo.AllISRAcks()))
	case "1":
		opts = append(opts, kgo.RequiredAcks(kgo.LeaderAck()))
	case "0":
		opts = append(opts, kgo.RequiredAcks(kgo.NoAck()))
	default:
		return nil, fmt.Errorf("bad acks %q", c.Acks)
	}
	if c.Idempotence != nil && !*c.Idempotence {
		opts = append(opts, kgo.DisableIdempotentWrite())
	}
	switch c.Compression {
	case "none", "":
		opts = append(opts, kgo.ProducerBatchCompression(kgo.NoCompression()))
	case "gzip":
		opts = append(opts, kgo.ProducerBatchCompression(kgo.GzipCompression()))
	case "snappy":
		opts = append(opts, kgo.ProducerBatchCompression(kgo.SnappyCompression()))
	case "lz4":
		opts = append(opts, kgo.ProducerBatchCompression(kgo.Lz4Compression()))
	case "zstd":
		opts = append(opts, kgo.ProducerBatchCompression(kgo.ZstdCompression()))
	default:
		return nil, fmt.Errorf("bad compression %q", c.Compression)
	}
	if c.LingerMs != nil {
		opts = append(opts, kgo.ProducerLinger(time.Duration(*c.LingerMs)*time.Millisecond))
	}
	if c.DeliveryTimeoutMs != nil {
		opts = append(opts, kgo.RecordDeliveryTimeout(time.Duration(*c.DeliveryTimeoutMs)*time.Millisecond))
	}
	if c.RequestTimeoutMs != nil {
		opts = append(opts, kgo.ProduceRequestTimeout(time.Duration(*c.RequestTimeoutMs)*time.Millisecond))
	}
	if c.Retries != nil {
		opts = append(opts, kgo.RecordRetries(*c.Retries))
	}
	if c.BatchSize != nil {
		opts = append(opts, kgo.ProducerBatchMaxBytes(*c.BatchSize))
	}
	if c.MaxInFlight != nil {
		opts = append(opts, kgo.MaxProduceRequestsInflightPerBroker(*c.MaxInFlight))
	}
	explicit := 0
	for _, r := range s.Records {
		if r.Partition != nil {
			explicit++
		}
	}
	switch {
	case explicit == len(s.Records) && explicit > 0:
		opts = append(opts, kgo.RecordPartitioner(kgo.ManualPartitioner()))
	case explicit > 0:
		return nil, errors.New("franz-client: give a partition for every record or for none")
	}

	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(time.Duration(s.TimeoutMs) * time.Millisecond)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()

	results := make([]*delivery, len(s.Records))
	var mu sync.Mutex
	start := time.Now()
	for i, r := range s.Records {
		kr := &kgo.Record{Topic: s.Topic, Key: r.Key, Value: r.Value}
		for _, h := range r.Headers {
			kr.Headers = append(kr.Headers, kgo.RecordHeader{Key: h.Key, Value: h.Value})
		}
		if r.Partition != nil {
			kr.Partition = *r.Partition
		}
		idx := i
		cl.Produce(ctx, kr, func(r *kgo.Record, err error) {
			d := report(r, err)
			if d.OK && c.Acks == "0" {
				d.Offset = nil // acks=0: the broker says nothing; franz-go counts on its own
			}
			mu.Lock()
			results[idx] = d
			mu.Unlock()
		})
		if s.FlushEvery > 0 && (i+1)%s.FlushEvery == 0 {
			_ = cl.Flush(ctx)
		}
		if s.Pause != nil && i+1 == s.Pause.After {
			_ = cl.Flush(ctx)
			for time.Now().Before(deadline) {
				if _, err := os.Stat(s.Pause.UntilFile); err == nil {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	if err := cl.Flush(ctx); err != nil {
		// The whole run's deadline passed: fail whatever is still buffered.
		cl.AbortBufferedRecords(context.Background())
	}
	cl.Close()

	mu.Lock()
	defer mu.Unlock()
	out := make([]*delivery, len(results))
	for i, d := range results {
		if d == nil {
			d = report(nil, errors.New("no delivery report before the deadline"))
		}
		out[i] = d
	}
	return map[string]any{"results": out, "elapsed_ms": time.Since(start).Milliseconds()}, nil
}

func report(r *kgo.Record, err error) *delivery {
	d := &delivery{OK: err == nil}
	if err == nil {
		p, o := r.Partition, r.Offset
		d.Partition, d.Offset = &p, &o
		return d
	}
	if r != nil && r.Partition >= 0 {
		p := r.Partition
		d.Partition = &p
	}
	msg := err.Error()
	d.ErrorMessage = &msg
	var ke *kerr.Error
	if errors.As(err, &ke) {
		code, name := ke.Code, ke.Message
		d.ErrorCode, d.ErrorName = &code, &name
	} else {
		name := clientErrorName(err)
		d.ErrorName = &name
	}
	return d
}

// clientErrorName names franz-go's own (non-protocol) errors.
func clientErrorName(err error) string {
	switch {
	case errors.Is(err, kgo.ErrRecordTimeout):
		return "CLIENT_RECORD_TIMEOUT"
	case errors.Is(err, kgo.ErrRecordRetries):
		return "CLIENT_RECORD_RETRIES"
	case errors.Is(err, kgo.ErrAborting):
		return "CLIENT_ABORTING"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return "CLIENT_DEADLINE"
	default:
		return "CLIENT_ERROR"
	}
}

// ---------------------------------------------------------------- consume

func consume(s *spec) (any, error) {
	if len(s.Config.Native) > 0 {
		return nil, fmt.Errorf("franz-go takes no raw properties (native: %v)", s.Config.Native)
	}
	opts, err := commonOpts(s)
	if err != nil {
		return nil, err
	}
	opts = append(opts,
		kgo.ConsumerGroup(s.GroupID),
		kgo.ConsumeTopics(s.Topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)
	if ms := s.Config.SessionTimeoutMs; ms != nil {
		opts = append(opts, kgo.SessionTimeout(time.Duration(*ms)*time.Millisecond))
	}
	if ms := s.Config.AutoCommitMs; ms != nil {
		opts = append(opts, kgo.AutoCommitInterval(time.Duration(*ms)*time.Millisecond))
	} else {
		opts = append(opts, kgo.DisableAutoCommit())
	}
	if p := s.Config.GroupProtocol; p != nil {
		switch *p {
		case "classic":
		case "consumer": // KIP-848: the broker assigns partitions
			opts = append(opts, kgo.ServerSideBalancer(), kgo.Balancers(kgo.RangeBalancer()))
		default:
			return nil, fmt.Errorf("bad group_protocol %q", *p)
		}
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(s.TimeoutMs)*time.Millisecond)
	defer cancel()

	stopped := func() bool {
		if s.StopFile == "" {
			return false
		}
		_, err := os.Stat(s.StopFile)
		return err == nil
	}
	records := []record{}
	for len(records) < s.ExpectedCount && ctx.Err() == nil && !stopped() {
		pctx, pcancel := context.WithTimeout(ctx, 200*time.Millisecond)
		fetches := cl.PollFetches(pctx)
		pcancel()
		for _, fe := range fetches.Errors() {
			if !errors.Is(fe.Err, context.DeadlineExceeded) && !errors.Is(fe.Err, context.Canceled) {
				fmt.Fprintf(os.Stderr, "franz-client: fetch %s/%d: %v\n", fe.Topic, fe.Partition, fe.Err)
			}
		}
		fetches.EachRecord(func(r *kgo.Record) {
			p, o, ts := r.Partition, r.Offset, r.Timestamp.UnixMilli()
			now := time.Now().UnixMilli()
			rec := record{Topic: r.Topic, Partition: &p, Offset: &o, Timestamp: &ts, ReceivedMs: &now, Key: r.Key, Value: r.Value, Headers: []header{}}
			for _, h := range r.Headers {
				rec.Headers = append(rec.Headers, header{Key: h.Key, Value: h.Value})
			}
			records = append(records, rec)
		})
	}
	if (s.Commit == nil || *s.Commit) && len(records) > 0 {
		cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer ccancel()
		if err := cl.CommitUncommittedOffsets(cctx); err != nil {
			return nil, fmt.Errorf("commit: %w", err)
		}
	}
	return map[string]any{"records": records}, nil
}

// ---------------------------------------------------------------- metadata

func metadata(s *spec) (any, error) {
	opts, err := commonOpts(s)
	if err != nil {
		return nil, err
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(s.TimeoutMs)*time.Millisecond)
	defer cancel()
	md, err := kadm.NewClient(cl).BrokerMetadata(ctx)
	if err != nil {
		return nil, err
	}
	type broker struct {
		NodeID int32  `json:"node_id"`
		Host   string `json:"host"`
		Port   int32  `json:"port"`
	}
	brokers := []broker{}
	for _, b := range md.Brokers {
		brokers = append(brokers, broker{b.NodeID, b.Host, b.Port})
	}
	var controller *int32
	if md.Controller >= 0 {
		controller = &md.Controller
	}
	return map[string]any{"cluster_id": md.Cluster, "controller_id": controller, "brokers": brokers}, nil
}
