// The worker's side of its images, for a driver that pulls them from registries: registry
// credentials from the controller handed to the driver, pre-pulls (`orchard image pull`) carried out
// with their progress reported, and the images held reported whenever they change, so the scheduler
// can prefer a worker that already has a VM's image.
import type { Logger } from 'pino';
import type { WorkerImagesReport } from '../api/schemas.ts';
import { PULL_IMAGE_ACTION, REGISTRIES_ACTION, type RegistryCredentials } from '../api/worker-protocol.ts';
import type { Reports } from './reports.ts';
import type { Driver, DriverImages } from './drivers/driver.ts';
import { Throttle } from './throttle.ts';

/** Pull progress goes to the controller at most this often (the last message of a pull always does). */
const PROGRESS_EVERY_MS = 1000;
/** Changes to the image store come in bursts (a pull writes many files): held images are read after they settle. */
const SETTLE_MS = 1000;

export interface ImagesReportOptions {
  reports: Reports;
  images: DriverImages;
  /** The driver's watch on its image store (Driver.watchImages), if it has one. */
  watchImages?: Driver['watchImages'];
  log: Logger;
  /** Does the controller take image reports (capability "worker-images")? */
  controllerTakesReports(): boolean;
}

export class WorkerImages {
  /** The instructions of ours this worker understands, declared in its record. */
  static readonly capabilities = [REGISTRIES_ACTION, PULL_IMAGE_ACTION];
  /** The images held, as last read (sent with every registration). */
  held: string[] = [];
  private reported?: string;
  private readonly pulls = new Map<string, Promise<void>>();
  private reporting: Promise<void> = Promise.resolve();
  private unwatch?: () => void;
  private settle?: NodeJS.Timeout;
  private readonly o: ImagesReportOptions;

  constructor(o: ImagesReportOptions) {
    this.o = o;
  }

  /** Reads what is held (for the registration), and follows the image store from now on. */
  async start() {
    this.held = await this.o.images.held().catch(() => []);
    this.unwatch = this.o.watchImages?.(() => this.changed());
  }

  /** The images held may have changed (the store changed, a VM's image came): read and report them once it settles. */
  changed() {
    clearTimeout(this.settle);
    this.settle = setTimeout(() => void this.refresh(), SETTLE_MS);
  }

  stop() {
    this.unwatch?.();
    clearTimeout(this.settle);
  }

  /** The registration carried `held`: what the controller has. */
  registered() {
    this.reported = JSON.stringify(this.held);
  }

  setRegistries(registries: RegistryCredentials[]) {
    this.o.images.setRegistries(registries);
    this.o.log.info({ registries: registries.map((r) => r.host) }, 'registry settings from the controller');
  }

  /** Reads the images held and reports them when they changed. */
  async refresh(pull?: WorkerImagesReport['pull']) {
    this.held = await this.o.images.held().catch((err: Error) => {
      this.o.log.warn({ err: err.message }, 'cannot list the images held');
      return this.held;
    });
    const now = JSON.stringify(this.held);
    if (now === this.reported && !pull) return;
    await this.report({ images: this.held, pull });
    this.reported = now;
  }

  /** pullImageAction: one pull per image at a time; its progress, then done or failed, to the controller. */
  pull(image: string): Promise<void> {
    const running = this.pulls.get(image);
    if (running) return running;
    const done = this.pullOnce(image).finally(() => this.pulls.delete(image));
    this.pulls.set(image, done);
    return done;
  }

  private async pullOnce(image: string) {
    const t0 = Date.now();
    const progress = new Throttle((message) => void this.report({ pull: { image, state: 'pulling', message } }), PROGRESS_EVERY_MS);
    this.o.log.info({ image }, 'pre-pulling an image');
    try {
      await this.o.images.pull(image, (message) => progress.push(message));
      progress.cancel();
      const seconds = ((Date.now() - t0) / 1000).toFixed(1);
      this.o.log.info({ image, seconds }, 'image pulled');
      await this.refresh({ image, state: 'done', message: `${image} is here (${seconds} s)` });
    } catch (err) {
      progress.cancel();
      const message = (err as Error).message;
      this.o.log.warn({ image, err: message }, 'pre-pull failed');
      await this.report({ pull: { image, state: 'failed', message: message.slice(0, 1000) } });
    }
  }

  /**
   * One report at a time, in order: a pull's last progress line still on its way must not land
   * after its `done` (the record would say it is pulling again).
   */
  private report(body: WorkerImagesReport): Promise<void> {
    if (!this.o.controllerTakesReports()) return Promise.resolve();
    this.reporting = this.reporting.then(() =>
      this.o.reports.workerImages(body).then(
        () => {},
        (err: Error) => this.o.log.warn({ err: err.message }, 'image report failed'),
      ));
    return this.reporting;
  }
}
