package tally.peers.flink;

import java.io.Writer;
import java.lang.management.ManagementFactory;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;

import org.apache.flink.api.common.JobExecutionResult;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.AggregateFunction;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.java.utils.ParameterTool;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.pulsar.source.PulsarSource;
import org.apache.flink.connector.pulsar.source.enumerator.cursor.StartCursor;
import org.apache.flink.connector.pulsar.source.enumerator.cursor.StopCursor;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.KeyedStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.functions.windowing.ProcessWindowFunction;
import org.apache.flink.streaming.api.windowing.assigners.SlidingEventTimeWindows;
import org.apache.flink.streaming.api.windowing.time.Time;
import org.apache.flink.streaming.api.windowing.windows.TimeWindow;
import org.apache.flink.util.Collector;

/**
 * The quick start's reading features in Flink, for `python -m tally.bench flink`:
 * per user the lifetime SUM(readtime) and COUNT, and SUM(readtime) over 7 days
 * sliding by 1 hour in event time. Reads a topic from its start up to the last
 * message there when the job starts, then ends; prints one JSON line of figures.
 *
 * <p>Arguments: --service-url, --admin-url, --topic, --subscription,
 * --check-window-end (epoch ms: the end of the sliding window whose per-user
 * sums are dumped), --out (folder of the dumps), --parallelism,
 * --out-of-orderness-ms, --window: "sliding" (Flink's SlidingEventTimeWindows,
 * a result per window), "tiles" (hour tiles in keyed state, Tally's layout,
 * the value emitted on every event) or "none" (the lifetime values alone).
 */
public final class ReadingJob {

    private ReadingJob() {
    }

    public static void main(String[] args) throws Exception {
        ParameterTool params = ParameterTool.fromArgs(args);
        int parallelism = params.getInt("parallelism", Runtime.getRuntime().availableProcessors());
        String out = params.getRequired("out");
        long checkWindowEnd = params.getLong("check-window-end");

        StreamExecutionEnvironment env = StreamExecutionEnvironment.createLocalEnvironment(parallelism);
        PulsarSource<Read> source = PulsarSource.builder()
                .setServiceUrl(params.getRequired("service-url"))
                .setAdminUrl(params.getRequired("admin-url"))
                .setTopics(params.getRequired("topic"))
                .setSubscriptionName(params.getRequired("subscription"))
                .setStartCursor(StartCursor.earliest())
                .setBoundedStopCursor(StopCursor.latest())
                .setDeserializationSchema(new ReadSchema())
                .build();
        WatermarkStrategy<Read> watermarks = WatermarkStrategy
                .<Read>forBoundedOutOfOrderness(Duration.ofMillis(params.getLong("out-of-orderness-ms", 5000)))
                .withTimestampAssigner((read, previous) -> read.ts);

        DataStream<Read> reads = env.fromSource(source, watermarks, "pulsar");
        KeyedStream<Read, Long> byUser = reads.keyBy(read -> read.user);
        byUser.process(new Lifetime()).name("lifetime")
                .addSink(new LastPerUser(out, "lifetime", Long.MIN_VALUE)).name("lifetime-sink");
        String window = params.get("window", "sliding");
        DataStream<UserValue> week = switch (window) {
            case "sliding" -> byUser.window(SlidingEventTimeWindows.of(Time.days(7), Time.hours(1)))
                    .aggregate(new SumReadtime(), new StampWindowEnd());
            case "tiles" -> byUser.process(new HourTiles(checkWindowEnd));
            case "none" -> null;
            default -> throw new IllegalArgumentException("--window: sliding, tiles or none");
        };
        if (week != null) {
            week.addSink(new LastPerUser(out, "sliding_7d", checkWindowEnd)).name("sliding-sink");
        }

        com.sun.management.OperatingSystemMXBean os =
                (com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean();
        long cpuBefore = os.getProcessCpuTime();
        JobExecutionResult result = env.execute("tally-peer-reading");
        long cpuNanos = os.getProcessCpuTime() - cpuBefore;
        System.out.printf("{\"events\": %d, \"lifetime_updates\": %d, \"window_results\": %d, "
                        + "\"job_seconds\": %.3f, \"job_cpu_seconds\": %.3f, \"parallelism\": %d}%n",
                (long) result.getAccumulatorResult("events"),
                (long) result.getAccumulatorResult("lifetime"),
                week != null ? (long) result.getAccumulatorResult("sliding_7d") : 0L,
                result.getNetRuntime() / 1000.0, cpuNanos / 1e9, parallelism);
    }

    /** Lifetime sum and count per user, updated (and emitted) on every read. */
    static final class Lifetime extends KeyedProcessFunction<Long, Read, UserValue> {
        private transient ValueState<UserValue> totals;
        private final org.apache.flink.api.common.accumulators.LongCounter events =
                new org.apache.flink.api.common.accumulators.LongCounter();

        @Override
        public void open(Configuration parameters) {
            totals = getRuntimeContext().getState(new ValueStateDescriptor<>("totals", UserValue.class));
            getRuntimeContext().addAccumulator("events", events);
        }

        @Override
        public void processElement(Read read, Context context, Collector<UserValue> out) throws Exception {
            events.add(1);
            UserValue total = totals.value();
            if (total == null) {
                total = new UserValue(read.user, 0.0, 0, Long.MIN_VALUE);
            }
            total.sum += read.readtime;
            total.count += 1;
            totals.update(total);
            out.collect(total);
        }
    }

    /**
     * SUM(readtime) over 7 days as 168 hour tiles per user (a ring indexed by
     * epoch % 168, the newest epoch beside it), as Tally keeps it: each event
     * adds to one tile and emits the user's sum; a timer at the checked
     * window's end, which fires when the bounded input ends, emits the sum
     * as of then for the dump.
     */
    static final class HourTiles extends KeyedProcessFunction<Long, Read, UserValue> {
        private static final long HOUR = 3_600_000L;
        private static final int TILES = 168;
        private final long checkWindowEnd;
        private transient ValueState<double[]> tiles;
        private transient ValueState<Long> newest;

        HourTiles(long checkWindowEnd) {
            this.checkWindowEnd = checkWindowEnd;
        }

        @Override
        public void open(Configuration parameters) {
            tiles = getRuntimeContext().getState(new ValueStateDescriptor<>("tiles", double[].class));
            newest = getRuntimeContext().getState(new ValueStateDescriptor<>("newest", Long.class));
        }

        @Override
        public void processElement(Read read, Context context, Collector<UserValue> out) throws Exception {
            long epoch = read.ts / HOUR;
            double[] ring = tiles.value();
            long top;
            if (ring == null) {
                ring = new double[TILES];
                top = epoch;
                context.timerService().registerEventTimeTimer(checkWindowEnd - 1);
            } else {
                top = newest.value();
            }
            for (long e = top + 1; e <= Math.min(epoch, top + TILES); e++) {
                ring[(int) (e % TILES)] = 0;       // tiles that left the window
            }
            top = Math.max(top, epoch);
            if (epoch > top - TILES) {             // older: in no window a read can see
                ring[(int) (epoch % TILES)] += read.readtime;
            }
            tiles.update(ring);
            newest.update(top);
            out.collect(new UserValue(read.user, sumAsOf(ring, top, top), 0, (top + 1) * HOUR));
        }

        @Override
        public void onTimer(long timestamp, OnTimerContext context, Collector<UserValue> out) throws Exception {
            double sum = sumAsOf(tiles.value(), newest.value(), (checkWindowEnd - 1) / HOUR);
            out.collect(new UserValue(context.getCurrentKey(), sum, 0, checkWindowEnd));
        }

        /** The sum of the tiles with epochs in (at - 168, at]; the ring holds (top - 168, top]. */
        private static double sumAsOf(double[] ring, long top, long at) {
            double sum = 0;
            for (long e = Math.max(top, at) - TILES + 1; e <= Math.min(top, at); e++) {
                if (e > at - TILES && e > top - TILES) {
                    sum += ring[(int) (e % TILES)];
                }
            }
            return sum;
        }
    }

    /** SUM(readtime) and COUNT of one window, incrementally. */
    static final class SumReadtime implements AggregateFunction<Read, double[], double[]> {
        @Override
        public double[] createAccumulator() {
            return new double[2];
        }

        @Override
        public double[] add(Read read, double[] sumCount) {
            sumCount[0] += read.readtime;
            sumCount[1] += 1;
            return sumCount;
        }

        @Override
        public double[] getResult(double[] sumCount) {
            return sumCount;
        }

        @Override
        public double[] merge(double[] a, double[] b) {
            return new double[] {a[0] + b[0], a[1] + b[1]};
        }
    }

    /** A window's result with its user and end. */
    static final class StampWindowEnd extends ProcessWindowFunction<double[], UserValue, Long, TimeWindow> {
        @Override
        public void process(Long user, Context context, Iterable<double[]> results, Collector<UserValue> out) {
            double[] sumCount = results.iterator().next();
            out.collect(new UserValue(user, sumCount[0], (long) sumCount[1], context.window().getEnd()));
        }
    }

    /**
     * Discards what it gets but counts it (an accumulator named after the
     * stream) and keeps each user's last value -- of the window ending at
     * {@code windowEnd}, unless that is Long.MIN_VALUE -- for a dump at the end.
     */
    static final class LastPerUser extends org.apache.flink.streaming.api.functions.sink.RichSinkFunction<UserValue> {
        private final String folder;
        private final String name;
        private final long windowEnd;
        private final org.apache.flink.api.common.accumulators.LongCounter seen =
                new org.apache.flink.api.common.accumulators.LongCounter();
        private transient Map<Long, UserValue> last;

        LastPerUser(String folder, String name, long windowEnd) {
            this.folder = folder;
            this.name = name;
            this.windowEnd = windowEnd;
        }

        @Override
        public void open(Configuration parameters) {
            getRuntimeContext().addAccumulator(name, seen);
            last = new HashMap<>();
        }

        @Override
        public void invoke(UserValue value, Context context) {
            seen.add(1);
            if (value.windowEnd == windowEnd) {
                last.put(value.user, new UserValue(value.user, value.sum, value.count, value.windowEnd));
            }
        }

        /** "user TAB sum TAB count" lines; Double.toString round-trips. */
        @Override
        public void close() throws Exception {
            Path path = Path.of(folder, name + "-" + getRuntimeContext().getIndexOfThisSubtask() + ".tsv");
            try (Writer writer = Files.newBufferedWriter(path)) {
                for (UserValue value : last.values()) {
                    writer.write(value.user + "\t" + value.sum + "\t" + value.count + "\n");
                }
            }
        }
    }

    /** A feature value of one user: a sum and a count, and the end of its window
     * (Long.MIN_VALUE for a lifetime value). A POJO, so Flink serialises it itself. */
    public static final class UserValue {
        public long user;
        public double sum;
        public long count;
        public long windowEnd;

        public UserValue() {
        }

        UserValue(long user, double sum, long count, long windowEnd) {
            this.user = user;
            this.sum = sum;
            this.count = count;
            this.windowEnd = windowEnd;
        }
    }
}
