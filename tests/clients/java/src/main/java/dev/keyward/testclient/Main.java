package dev.keyward.testclient;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Collection;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReferenceArray;
import org.apache.kafka.clients.CommonClientConfigs;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.config.SaslConfigs;
import org.apache.kafka.common.config.SslConfigs;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.protocol.Errors;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * Test client CLI over the official Java client.
 *
 * <p>Usage: {@code Main SPEC.json} or {@code Main -} (spec on stdin). Prints exactly one JSON
 * document on stdout; everything else (client logs) goes to stderr. The spec format is shared
 * with the Go client and documented in tests/e2e/harness/clients.py. Bytes travel as standard
 * base64, null stays null. Errors are reported with the Kafka protocol's code and name, through
 * {@link Errors#forException}.
 */
public final class Main {
  private static final ObjectMapper JSON = new ObjectMapper();
  private static final Base64.Encoder B64E = Base64.getEncoder();
  private static final Base64.Decoder B64D = Base64.getDecoder();

  private Main() {}

  public static void main(String[] args) throws Exception {
    PrintStream out = System.out;
    // Keep stdout for the one JSON result, whatever a library prints.
    System.setOut(System.err);
    if (args.length != 1) {
      System.err.println("usage: Main SPEC.json | -");
      System.exit(2);
    }
    JsonNode spec;
    if (args[0].equals("-")) {
      try (InputStream in = System.in) {
        spec = JSON.readTree(in);
      }
    } else {
      spec = JSON.readTree(Files.readAllBytes(Path.of(args[0])));
    }
    String op = spec.path("op").asText();
    ObjectNode result =
        switch (op) {
          case "produce" -> produce(spec);
          case "consume" -> consume(spec);
          case "metadata" -> metadata(spec);
          case "describe_topics" -> describeTopics(spec);
          default -> throw new IllegalArgumentException("unknown op: " + op);
        };
    out.println(JSON.writeValueAsString(result));
    out.flush();
    // Client threads must not keep the JVM alive past the answer.
    System.exit(0);
  }

  // ---------------------------------------------------------------- produce

  private static ObjectNode produce(JsonNode spec) throws Exception {
    JsonNode c = spec.path("config");
    long timeoutMs = spec.path("timeout_ms").asLong(30_000);
    Properties p = new Properties();
    p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, spec.path("bootstrap").asText());
    p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    p.put(ProducerConfig.ACKS_CONFIG, c.path("acks").asText("all"));
    p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, String.valueOf(c.path("idempotence").asBoolean(true)));
    p.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, c.path("compression").asText("none"));
    putIfSet(p, ProducerConfig.LINGER_MS_CONFIG, c.get("linger_ms"));
    putIfSet(p, ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, c.get("delivery_timeout_ms"));
    putIfSet(p, ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, c.get("request_timeout_ms"));
    putIfSet(p, ProducerConfig.RETRIES_CONFIG, c.get("retries"));
    putIfSet(p, ProducerConfig.BATCH_SIZE_CONFIG, c.get("batch_size"));
    putIfSet(p, ProducerConfig.MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION, c.get("max_in_flight"));
    putIfSet(p, ProducerConfig.CLIENT_ID_CONFIG, c.get("client_id"));
    putSecurity(p, c.path("security"));
    // send() blocks for metadata at most this long; never longer than the whole run.
    p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, String.valueOf(c.path("delivery_timeout_ms").asLong(timeoutMs)));
    putNative(p, c.path("native"));

    JsonNode records = spec.path("records");
    String topic = spec.path("topic").asText();
    int n = records.size();
    int flushEvery = spec.path("flush_every").asInt(0);
    // Kept across a switch: after the first `after` records are sent and flushed, the same
    // producer waits until `until_file` exists before it sends the rest.
    int pauseAfter = spec.path("pause").path("after").asInt(-1);
    java.nio.file.Path pauseFile = java.nio.file.Path.of(spec.path("pause").path("until_file").asText("."));
    AtomicReferenceArray<ObjectNode> results = new AtomicReferenceArray<>(n);

    long start = System.nanoTime();
    try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p)) {
      for (int i = 0; i < n; i++) {
        JsonNode r = records.get(i);
        RecordHeaders headers = new RecordHeaders();
        for (JsonNode h : r.path("headers")) {
          headers.add(h.path("key").asText(), bytes(h.get("value")));
        }
        Integer partition = r.hasNonNull("partition") ? r.get("partition").asInt() : null;
        ProducerRecord<byte[], byte[]> rec =
            new ProducerRecord<>(topic, partition, bytes(r.get("key")), bytes(r.get("value")), headers);
        final int idx = i;
        try {
          producer.send(rec, (md, ex) -> results.set(idx, ex == null ? delivered(md) : failed(md, ex)));
        } catch (Exception e) {
          results.compareAndSet(idx, null, failed(null, e));
        }
        if (flushEvery > 0 && (i + 1) % flushEvery == 0) {
          producer.flush();
        }
        if (i + 1 == pauseAfter) {
          producer.flush();
          long until = start + TimeUnit.MILLISECONDS.toNanos(timeoutMs);
          while (!java.nio.file.Files.exists(pauseFile) && System.nanoTime() < until) {
            Thread.sleep(100);
          }
        }
      }
      producer.flush();
      producer.close(Duration.ofSeconds(5));
    }
    ObjectNode out = JSON.createObjectNode();
    ArrayNode arr = out.putArray("results");
    for (int i = 0; i < n; i++) {
      ObjectNode r = results.get(i);
      arr.add(r != null ? r : failed(null, new IllegalStateException("no delivery report")));
    }
    out.put("elapsed_ms", TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - start));
    return out;
  }

  private static ObjectNode delivered(RecordMetadata md) {
    ObjectNode o = JSON.createObjectNode();
    o.put("ok", true);
    o.put("partition", md.partition());
    if (md.hasOffset()) {
      o.put("offset", md.offset());
    } else {
      o.putNull("offset"); // acks=0: the broker says nothing
    }
    o.putNull("error_code");
    o.putNull("error_name");
    o.putNull("error_message");
    return o;
  }

  private static ObjectNode failed(RecordMetadata md, Throwable ex) {
    Throwable t = unwrap(ex);
    Errors err = Errors.forException(t);
    ObjectNode o = JSON.createObjectNode();
    o.put("ok", false);
    if (md != null && md.partition() >= 0) {
      o.put("partition", md.partition());
    } else {
      o.putNull("partition");
    }
    o.putNull("offset");
    o.put("error_code", err.code());
    o.put("error_name", err.name());
    o.put("error_message", t.getClass().getName() + ": " + t.getMessage());
    return o;
  }

  private static Throwable unwrap(Throwable t) {
    while ((t instanceof ExecutionException || t instanceof CompletionException) && t.getCause() != null) {
      t = t.getCause();
    }
    return t;
  }

  // ---------------------------------------------------------------- consume

  private static ObjectNode consume(JsonNode spec) throws IOException {
    JsonNode c = spec.path("config");
    Properties p = new Properties();
    p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, spec.path("bootstrap").asText());
    p.put(ConsumerConfig.GROUP_ID_CONFIG, spec.path("group_id").asText());
    p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    putIfSet(p, ConsumerConfig.CLIENT_ID_CONFIG, c.get("client_id"));
    putIfSet(p, ConsumerConfig.GROUP_PROTOCOL_CONFIG, c.get("group_protocol"));
    if (c.hasNonNull("session_timeout_ms")) {
      p.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, c.get("session_timeout_ms").asText());
    }
    if (c.hasNonNull("auto_commit_ms")) {
      p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "true");
      p.put(ConsumerConfig.AUTO_COMMIT_INTERVAL_MS_CONFIG, c.get("auto_commit_ms").asText());
    }
    putSecurity(p, c.path("security"));
    putNative(p, c.path("native"));

    List<String> topics = new ArrayList<>();
    spec.path("topics").forEach(t -> topics.add(t.asText()));
    int expected = spec.path("expected_count").asInt();
    long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(spec.path("timeout_ms").asLong(30_000));
    boolean commit = spec.path("commit").asBoolean(true);
    java.nio.file.Path stopFile = spec.hasNonNull("stop_file") ? java.nio.file.Path.of(spec.get("stop_file").asText()) : null;

    ObjectNode out = JSON.createObjectNode();
    ArrayNode arr = out.putArray("records");
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(p)) {
      consumer.subscribe(topics);
      while (arr.size() < expected && System.nanoTime() < deadline
          && (stopFile == null || !java.nio.file.Files.exists(stopFile))) {
        for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
          arr.add(record(r));
        }
      }
      if (commit && arr.size() > 0) {
        consumer.commitSync(Duration.ofSeconds(10));
      }
    }
    return out;
  }

  private static ObjectNode record(ConsumerRecord<byte[], byte[]> r) {
    ObjectNode o = JSON.createObjectNode();
    o.put("topic", r.topic());
    o.put("partition", r.partition());
    o.put("offset", r.offset());
    o.put("timestamp", r.timestamp());
    o.put("received_ms", System.currentTimeMillis());
    putBytes(o, "key", r.key());
    putBytes(o, "value", r.value());
    ArrayNode hs = o.putArray("headers");
    for (Header h : r.headers()) {
      ObjectNode ho = hs.addObject();
      ho.put("key", h.key());
      putBytes(ho, "value", h.value());
    }
    return o;
  }

  // ---------------------------------------------------------------- metadata

  /** An admin client's properties from a spec: bootstrap, timeouts, security, native. */
  private static Properties adminProperties(JsonNode spec, long timeoutMs) throws IOException {
    Properties p = new Properties();
    p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, spec.path("bootstrap").asText());
    p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, String.valueOf(timeoutMs));
    p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, String.valueOf(Math.min(timeoutMs, 30_000)));
    putSecurity(p, spec.path("config").path("security"));
    putNative(p, spec.path("config").path("native"));
    return p;
  }

  private static ObjectNode metadata(JsonNode spec) throws Exception {
    long timeoutMs = spec.path("timeout_ms").asLong(15_000);
    ObjectNode out = JSON.createObjectNode();
    try (Admin admin = Admin.create(adminProperties(spec, timeoutMs))) {
      DescribeClusterResult dc = admin.describeCluster();
      Collection<Node> nodes = dc.nodes().get(timeoutMs, TimeUnit.MILLISECONDS);
      Node controller = dc.controller().get(timeoutMs, TimeUnit.MILLISECONDS);
      out.put("cluster_id", dc.clusterId().get(timeoutMs, TimeUnit.MILLISECONDS));
      if (controller != null && !controller.isEmpty()) {
        out.put("controller_id", controller.id());
      } else {
        out.putNull("controller_id");
      }
      ArrayNode arr = out.putArray("brokers");
      for (Node n : nodes) {
        ObjectNode o = arr.addObject();
        o.put("node_id", n.id());
        o.put("host", n.host());
        o.put("port", n.port());
      }
    }
    return out;
  }

  /** The admin client's description of topics: id, and each partition's leader and ISR. */
  private static ObjectNode describeTopics(JsonNode spec) throws Exception {
    long timeoutMs = spec.path("timeout_ms").asLong(15_000);
    List<String> names = new ArrayList<>();
    spec.path("topics").forEach(t -> names.add(t.asText()));
    ObjectNode out = JSON.createObjectNode();
    ArrayNode arr = out.putArray("topics");
    try (Admin admin = Admin.create(adminProperties(spec, timeoutMs))) {
      Map<String, org.apache.kafka.clients.admin.TopicDescription> described =
          admin.describeTopics(names).allTopicNames().get(timeoutMs, TimeUnit.MILLISECONDS);
      for (String name : names) {
        org.apache.kafka.clients.admin.TopicDescription d = described.get(name);
        ObjectNode o = arr.addObject();
        o.put("name", d.name());
        o.put("topic_id", d.topicId().toString());
        ArrayNode parts = o.putArray("partitions");
        for (org.apache.kafka.common.TopicPartitionInfo tp : d.partitions()) {
          ObjectNode po = parts.addObject();
          po.put("partition", tp.partition());
          po.put("leader", tp.leader() == null ? -1 : tp.leader().id());
          po.put("isr", tp.isr().size());
        }
      }
    }
    return out;
  }

  // ---------------------------------------------------------------- helpers

  private static byte[] bytes(JsonNode n) {
    return n == null || n.isNull() ? null : B64D.decode(n.asText());
  }

  private static void putBytes(ObjectNode o, String field, byte[] b) {
    if (b == null) {
      o.putNull(field);
    } else {
      o.put(field, B64E.encodeToString(b));
    }
  }

  private static void putIfSet(Properties p, String key, JsonNode v) {
    if (v != null && !v.isNull()) {
      p.put(key, v.asText());
    }
  }

  /**
   * The harness's {@code security} knob (see clients.py): TLS trusting the PEM bundle "ca" with
   * hostname verification (the client's default, endpoint identification "https"), a client
   * certificate from the PEM files "cert"/"key", SASL "mechanism" with "username"/"password".
   * Absent or null: PLAINTEXT.
   */
  private static void putSecurity(Properties p, JsonNode sec) throws IOException {
    if (sec.isMissingNode() || sec.isNull()) {
      return;
    }
    p.put(CommonClientConfigs.SECURITY_PROTOCOL_CONFIG, sec.path("protocol").asText());
    if (sec.hasNonNull("ca")) {
      p.put(SslConfigs.SSL_TRUSTSTORE_TYPE_CONFIG, "PEM");
      p.put(SslConfigs.SSL_TRUSTSTORE_LOCATION_CONFIG, sec.get("ca").asText());
    }
    if (sec.hasNonNull("cert")) {
      // Inline PEM: the only way kafka-clients takes an unencrypted key.
      p.put(SslConfigs.SSL_KEYSTORE_TYPE_CONFIG, "PEM");
      p.put(SslConfigs.SSL_KEYSTORE_CERTIFICATE_CHAIN_CONFIG, Files.readString(Path.of(sec.get("cert").asText())));
      p.put(SslConfigs.SSL_KEYSTORE_KEY_CONFIG, Files.readString(Path.of(sec.get("key").asText())));
    }
    if (sec.hasNonNull("mechanism")) {
      String mechanism = sec.get("mechanism").asText();
      String module =
          mechanism.equals("PLAIN")
              ? "org.apache.kafka.common.security.plain.PlainLoginModule"
              : "org.apache.kafka.common.security.scram.ScramLoginModule";
      p.put(SaslConfigs.SASL_MECHANISM, mechanism);
      p.put(
          SaslConfigs.SASL_JAAS_CONFIG,
          module
              + " required username=" + jaasQuote(sec.path("username").asText())
              + " password=" + jaasQuote(sec.path("password").asText()) + ";");
    }
  }

  private static String jaasQuote(String s) {
    return '"' + s.replace("\\", "\\\\").replace("\"", "\\\"") + '"';
  }

  /** Raw client properties, passed through untouched: the escape hatch for one-off knobs. */
  private static void putNative(Properties p, JsonNode nativeProps) {
    Iterator<Map.Entry<String, JsonNode>> it = nativeProps.fields();
    while (it.hasNext()) {
      Map.Entry<String, JsonNode> e = it.next();
      p.put(e.getKey(), e.getValue().asText());
    }
  }
}
